"""MixLoRA: a dense base's FFNs become LoRA experts behind a router; the router and the experts' LoRA factors
train, the base stays frozen (`finetune.method=mixlora` with `model.moe.num_experts` and `model.moe.lora_rank`)."""

from __future__ import annotations

import jax

from jaxllm.config import ModelConfig
from jaxllm.language_model import Params
from jaxllm.train.methods.added_modules import AddedModules
from jaxllm.train.methods.registry import register


@register("mixlora")
class MixLora(AddedModules):
    added = "moe"

    def base_has_added(self, base_cfg: ModelConfig) -> bool:
        return bool(base_cfg.moe.num_experts)

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
