"""S²FT (`finetune.method=s2ft`, `finetune.s2ft.*`): row deltas on a few attention heads of `o` and a few MLP channels
of `down` in every layer (`jaxllm.peft.s2ft`), trained with LoRA's machinery; they merge into the base in place. No peft
format exists for it: the finished run is its merged model (`jaxllm convert` writes a Hugging Face checkpoint)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from jaxllm.config import Config
from jaxllm.language_model import LanguageModel, Params
from jaxllm.peft.s2ft import S2ftAdapter
from jaxllm.train.methods.lora import Lora
from jaxllm.train.methods.registry import register


@register("s2ft")
class S2ft(Lora):
    kind = "S²FT"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> S2ftAdapter:
        c = cfg.finetune.s2ft
        return S2ftAdapter(lm, c.head_fraction, c.channel_fraction, c.seed)

    def export(self, trained: Params, run_dir: Path, console: Console) -> Path | None:
        console.print("S²FT has no peft format: the run loads as its merged model (`jaxllm convert` for Hugging Face)")
        return None
