"""Read-ME (`finetune.method=pregate`, `finetune.pregate`): the dense base (`finetune.base`) refactored into the run's
pre-gated MoE (`jaxllm.moe.refactor`, grouped on `finetune.calibration` rows), then the pre-gating router
trained by distillation: each step minimises the soft cross entropy of the MoE's next-token distribution against the
dense model's (= KL + the teacher's entropy; the log's `cross_entropy` is this, `eval_loss` is against the data),
plus the router losses. The experts and shared FFN train too with `finetune.pregate.train_experts`. The finished run
is a jaxllm MoE model (`generate` / `eval` load it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.config import Config, ConfigError, MoeConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.losses import distillation_sums
from jaxllm.moe.refactor import refactor_dense
from jaxllm.train.methods.added_modules import join
from jaxllm.train.methods.base_model import Base, fresh_copies, with_execution_of
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import register

_EXPERT_PARAMS = ("gate", "up", "down", "shared")  # under blocks/mlp


@register("pregate")
class PregateDistillation(TrainingMethod):
    def __init__(self, cfg: Config, lm: LanguageModel):
        super().__init__(cfg, lm)
        if not cfg.model.moe.num_experts or cfg.model.moe.router != "pregate":
            raise ConfigError("finetune.method=pregate trains a pre-gated MoE: set model.moe.num_experts and "
                              "model.moe.router=pregate (the base is the dense model it is refactored from)")
        self.teacher_lm = LanguageModel(dataclasses.replace(cfg.model, moe=MoeConfig()), lm.rules)
        # the step runs the same params with every expert computed, unchosen ones at weight 0 (the same values): the
        # router learns from every expert's gradient, not only the chosen one's
        self.student_lm = LanguageModel(dataclasses.replace(cfg.model, moe=dataclasses.replace(
            cfg.model.moe, router_grad="all")), lm.rules)

    def _split(self, tree: Any) -> tuple[Any, Any]:
        """(trained, fixed): trees shaped like the MoE's params, None where a leaf is in the other half."""
        train_experts = self.cfg.finetune.pregate.train_experts

        def trained(path) -> bool:
            keys = [getattr(k, "key", None) for k in path]
            return keys[0] == "pregate" or (train_experts and keys[:2] == ["blocks", "mlp"] and keys[2] in _EXPERT_PARAMS)

        pick = lambda want: jax.tree_util.tree_map_with_path(lambda p, x: x if trained(p) == want else None, tree)
        return pick(True), pick(False)

    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        cfg, lm = self.cfg, self.lm
        dense_cfg = with_execution_of(base.cfg, cfg.model)
        rows = self.calibration_rows()
        if not rows:
            raise ConfigError("finetune.method=pregate groups the FFN neurons on finetune.calibration rows: none found")
        teacher_lm = self.teacher_lm
        if base.cfg.moe.num_experts or dataclasses.replace(dense_cfg, moe=MoeConfig()) != teacher_lm.cfg:
            raise ConfigError(f"finetune.method=pregate: the base ({cfg.finetune.base!r}) is not the dense model the run's "
                              "model.moe refactors (the same config with model.moe unset)")
        teacher = jax.device_put(base.params, teacher_lm.param_shardings(mesh))
        params, _ = refactor_dense(teacher_lm, teacher, cfg.model, rows, key)
        shardings = lm.param_shardings(mesh)
        trained, fixed = self._split(jax.device_put(params, shardings))
        trained_shardings = self._split(shardings)[0]
        return Prepared(fresh_copies(trained, trained_shardings), trained_shardings, {"student": fixed, "teacher": teacher})

    def to_model(self, trained: Params, frozen: Any, rng: jax.Array | None) -> Params:
        return join(trained, frozen["student"])

    def objective_sums(self, model_params: Params, frozen: Any, batch: dict[str, jax.Array], z_loss: float):
        args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        student_BTV, stats = self.student_lm.logits_and_stats(model_params, *args)
        teacher_BTV = self.teacher_lm.apply(frozen["teacher"], *args)
        soft_ce, _, n = distillation_sums(student_BTV, teacher_BTV, batch.get("loss_mask"))
        aux = self.lm.moe_aux_loss(stats) * n
        return soft_ce + aux, (soft_ce, jnp.zeros((), jnp.float32), n, aux), stats

    def flops_per_token(self, seq_len: int) -> float:
        """The MoE's forward and input gradients, weight gradients only for what trains (the router's are not
        counted: not matmul weights), plus the dense teacher's forward."""
        c, lm = self.lm.cfg, self.lm
        m = c.moe
        trained_ffn = c.num_layers * 3 * c.d_model * (m.top_k * m.d_ff + (m.shared_d_ff or 0))
        frozen = lm.active_matmul_params - (trained_ffn if self.cfg.finetune.pregate.train_experts else 0)
        return lm.flops_per_token(seq_len, frozen_matmul_params=frozen) + self.teacher_lm.flops_per_token(
            seq_len, training=False)

    def describe(self, trained_abstract: Params) -> str:
        n = sum(x.size for x in jax.tree.leaves(trained_abstract))
        what = "pre-gating router, experts and shared FFN" if self.cfg.finetune.pregate.train_experts else "pre-gating router"
        return f"{n:,} trained params ({what}), distilled from the dense base"
