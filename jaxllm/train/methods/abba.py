"""ABBA (`finetune.method=abba`): LoRA's machinery with Hadamard-product adapters (`jaxllm.peft.abba`); rank, alpha,
targets and quantisation from `finetune.lora`; exported as a peft LoHa adapter (the same update form)."""

from __future__ import annotations

from jaxllm.config import Config
from jaxllm.language_model import LanguageModel
from jaxllm.peft.abba import AbbaAdapter
from jaxllm.train.methods.lora import Lora
from jaxllm.train.methods.registry import register


@register("abba")
class Abba(Lora):
    kind = "ABBA"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> AbbaAdapter:
        return AbbaAdapter(lm, cfg.finetune.lora)
