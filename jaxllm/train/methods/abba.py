"""ABBA (`finetune.method=abba`): LoRA's machinery with Hadamard-product adapters (`jaxllm.peft.abba`); rank, alpha,
targets and quantisation from `finetune.lora`; exported as a peft LoHa adapter (the same update form)."""

from jaxllm.peft.abba import AbbaAdapter
from jaxllm.train.methods.lora import adapter_method

Abba = adapter_method("abba", "ABBA", lambda lm, cfg: AbbaAdapter(lm, cfg.finetune.lora))
