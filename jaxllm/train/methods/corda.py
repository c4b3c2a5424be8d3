"""CorDA (`finetune.method=corda`, `finetune.corda.mode: ipm | kpm`): before training, a calibration pass over
`finetune.calibration.samples` token rows (of `finetune.calibration.data`, or the fine-tuning data) collects each
target's input covariance on the base; the adapters come from the covariance-oriented SVD (`jaxllm.peft.corda`)
and then train as a residual-init LoRA (rank, alpha, targets from `finetune.lora`)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxllm.config import Config, ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.peft.corda import CordaAdapter
from jaxllm.train.methods.lora import Lora
from jaxllm.train.methods.registry import register


@register("corda")
class Corda(Lora):
    kind = "CorDA"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> CordaAdapter:
        return CordaAdapter(lm, cfg.finetune.lora, cfg.finetune.corda.mode)

    def initialise(self, key: jax.Array, base: Params, mesh: Mesh) -> tuple[Params, Params]:
        try:
            self.adapter.calibrate(base, iter(self.calibration_rows()))
        except ValueError as err:  # no rows
            raise ConfigError(f"finetune.method=corda: {err}; finetune.calibration.data holds no calibration text") from err
        trained, frozen = self.adapter.init(key, jax.device_get(base))
        return (jax.device_put(trained, self.adapter.shardings(mesh)),
                jax.device_put(frozen, self.adapter.frozen_shardings(mesh)))
