"""Bone and Bat (`finetune.method=bone|bat`; peft's MiSS): LoRA's machinery with block-affine adapters
(`jaxllm.peft.miss`) of rank `finetune.lora.rank` on `finetune.lora.targets`; exported as a peft MiSS adapter."""

from __future__ import annotations

from jaxllm.config import Config
from jaxllm.language_model import LanguageModel
from jaxllm.peft.miss import MissAdapter
from jaxllm.train.methods.lora import Lora
from jaxllm.train.methods.registry import register


@register("bone")
class Bone(Lora):
    kind = "Bone"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> MissAdapter:
        return MissAdapter(lm, cfg.finetune.lora, bat=False)


@register("bat")
class Bat(Lora):
    kind = "Bat"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> MissAdapter:
        return MissAdapter(lm, cfg.finetune.lora, bat=True)
