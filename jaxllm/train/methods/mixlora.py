"""MixLoRA: a dense base's FFNs become LoRA experts behind a router; the router and the experts' LoRA factors
train, the base stays frozen (`finetune.method=mixlora` with `model.moe.num_experts` and `model.moe.lora_rank`)."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from jaxllm.config import ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.models.mixlora import from_dense, join, split_trainable
from jaxllm.train.methods.base_model import Base, fresh_copies, with_execution_of
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import register


@register("mixlora")
class MixLora(TrainingMethod):
    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        cfg, lm = self.cfg, self.lm
        dense = dataclasses.replace(cfg.model, moe=base.cfg.moe)  # compare all but model.moe
        if with_execution_of(base.cfg, dense) != dense or base.cfg.moe.num_experts:
            raise ConfigError(f"finetune.method=mixlora needs a dense base with this architecture; "
                              f"{cfg.finetune.base!r} differs")
        placed = jax.device_put(base.params, LanguageModel(dense, lm.rules).param_shardings(mesh))
        shardings = lm.param_shardings(mesh)
        params = jax.jit(lambda b, k: from_dense(b, lm.init(k)), out_shardings=shardings)(placed, key)
        trained, frozen = split_trainable(params)
        trained_shardings = split_trainable(shardings)[0]
        return Prepared(fresh_copies(trained, trained_shardings), trained_shardings, frozen)

    def to_model(self, trained: Params, frozen: Params, rng: jax.Array | None) -> Params:
        return join(trained, frozen)

    def flops_per_token(self, seq_len: int) -> float:
        """The router and the chosen experts' LoRA deltas train; the base gets no weight gradient."""
        c, lm = self.lm.cfg, self.lm
        m = c.moe
        trained = (c.num_layers // m.every) * (c.d_model * m.num_experts
                                               + m.top_k * 3 * m.lora_rank * (c.d_model + c.mlp.d_ff))
        return lm.flops_per_token(seq_len, frozen_matmul_params=lm.active_matmul_params - trained)

    def describe(self, trained_abstract: Params) -> str:
        n = sum(x.size for x in jax.tree.leaves(trained_abstract))
        return f"{n:,} trainable MixLoRA params (router + LoRA experts) on a frozen {self.lm.num_params - n:,}-param base"
