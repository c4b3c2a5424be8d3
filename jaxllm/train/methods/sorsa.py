"""SORSA (`finetune.method=sorsa`): LoRA's machinery with adapters that are each target's principal singular triplets
(`jaxllm.peft.sorsa`), under an orthonormality regulariser weighted by `finetune.sorsa.gamma`; rank, targets and
quantisation from `finetune.lora`. Exports as a peft LoRA adapter on the original base."""

from __future__ import annotations

import jax

from jaxllm.config import Config
from jaxllm.language_model import LanguageModel, Params
from jaxllm.peft.sorsa import SorsaAdapter
from jaxllm.train.methods.lora import Lora
from jaxllm.train.methods.registry import register


@register("sorsa")
class Sorsa(Lora):
    kind = "SORSA"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> SorsaAdapter:
        return SorsaAdapter(lm, cfg.finetune.lora)

    def regularizers(self, trained: Params, frozen: Params) -> dict[str, jax.Array]:
        return {"orthonormality": self.cfg.finetune.sorsa.gamma * self.adapter.orthonormality(trained)}

    def as_lora(self, trained: Params) -> Params:
        return self.adapter.as_lora(trained)
