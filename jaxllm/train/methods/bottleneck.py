"""Bottleneck adapters (`finetune.method=bottleneck`, `model.bottleneck`): series or parallel adapters on the attention
and/or MLP sublayers of a frozen base train. They are modules, not weight deltas: nothing merges or exports to peft,
and the finished run is a jaxllm model (`generate`, `eval` load it; a Hugging Face export says why it cannot)."""

from __future__ import annotations

import jax

from jaxllm.config import ModelConfig
from jaxllm.language_model import Params
from jaxllm.train.methods.added_modules import AddedModules
from jaxllm.train.methods.registry import register


@register("bottleneck")
class Bottleneck(AddedModules):
    added = "bottleneck"

    def base_has_added(self, base_cfg: ModelConfig) -> bool:
        return bool(base_cfg.bottleneck.width)

    def flops_per_token(self, seq_len: int) -> float:
        """The base's forward and input gradients; weight gradients only for the adapters' kernels."""
        c, lm = self.lm.cfg, self.lm
        adapter_kernels = c.num_layers * len(c.bottleneck.sublayers) * 2 * c.d_model * c.bottleneck.width
        return lm.flops_per_token(seq_len, frozen_matmul_params=lm.active_matmul_params - adapter_kernels)

    def describe(self, trained_abstract: Params) -> str:
        b, n = self.lm.cfg.bottleneck, sum(x.size for x in jax.tree.leaves(trained_abstract))
        return (f"{n:,} trainable params: {b.placement} bottleneck adapters (width {b.width}) on "
                f"{' and '.join(b.sublayers)} of a frozen {self.lm.num_params - n:,}-param base")
