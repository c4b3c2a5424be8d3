"""Bottleneck adapters (Houlsby et al., 2019; LLM-Adapters, Hu et al., 2023) on a block's sublayers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.layers import Dense
from jaxllm.models.mlp import ACTIVATIONS


class Bottleneck(nnx.Module):
    """y_BTD + scale * up(act(down(u_BTD))): `down` [D, W] (bias; normal 1/sqrt(D)) and `up` [W, D] (bias; zeros),
    W = `model.bottleneck.width`; u is the sublayer's output y (series) or its normed input x (parallel)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        b = cfg.bottleneck
        self.series, self.activation, self.scale = b.placement == "series", b.activation, b.scale
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.down = Dense((cfg.d_model,), (b.width,), ("embed", None), std=cfg.d_model ** -0.5, **kw)
        self.up = Dense((b.width,), (cfg.d_model,), (None, "embed"), std=0.0, **kw)

    def __call__(self, x_BTD: jax.Array, y_BTD: jax.Array) -> jax.Array:
        """The sublayer's output `y_BTD` [B, T, D] adapted; `x_BTD` [B, T, D] its (normed) input."""
        h_BTW = ACTIVATIONS[self.activation](self.down(y_BTD if self.series else x_BTD))
        return y_BTD + self.scale * self.up(h_BTW)
