"""Bone and Bat (`finetune.method=bone|bat`; peft's MiSS): LoRA's machinery with block-affine adapters
(`jaxllm.peft.miss`) of rank `finetune.lora.rank` on `finetune.lora.targets`; exported as a peft MiSS adapter."""

from jaxllm.peft.miss import MissAdapter
from jaxllm.train.methods.lora import adapter_method

Bone = adapter_method("bone", "Bone", lambda lm, cfg: MissAdapter(lm, cfg.finetune.lora, bat=False))
Bat = adapter_method("bat", "Bat", lambda lm, cfg: MissAdapter(lm, cfg.finetune.lora, bat=True))
