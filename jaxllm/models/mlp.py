"""Feed-forward block: gated (SwiGLU/GeGLU) or plain (GPT-2) MLP, its maps dense or structured."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.models.layers import Dense
from jaxllm.models.structured import StructuredLinear
from jaxllm.sharding import Rules, constrain

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class Mlp(nnx.Module):
    """down(act(gate(x)) * up(x)) if gated else down(act(up(x))). Kernels [D, F] and [F, D]."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        self.rules, self.activation = rules, cfg.mlp.activation
        D, F = cfg.d_model, cfg.mlp.d_ff
        kw = dict(
            use_bias=cfg.bias == "all", dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs
        )
        down_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        if cfg.mlp.structure == "dense":
            self.gate = Dense((D,), (F,), ("embed", "mlp"), std=cfg.init_std, **kw) if cfg.mlp.gated else None
            self.up = Dense((D,), (F,), ("embed", "mlp"), std=cfg.init_std, **kw)
            self.down = Dense((F,), (D,), ("mlp", "embed"), std=down_std, **kw)
        else:  # structured maps (no biases): jaxllm.models.structured
            if cfg.bias == "all":
                raise ConfigError("model.mlp.structure needs model.bias none or qkv (structured maps have no bias)")
            make = lambda i, o, axes, std: StructuredLinear(cfg, i, o, axes, std=std, rngs=rngs)
            self.gate = make(D, F, ("embed", "mlp"), cfg.init_std) if cfg.mlp.gated else None
            self.up = make(D, F, ("embed", "mlp"), cfg.init_std)
            self.down = make(F, D, ("mlp", "embed"), down_std)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h_BTF = act(self.gate(x_BTD)) * self.up(x_BTD) if self.gate is not None else act(self.up(x_BTD))
        h_BTF = constrain(h_BTF, ("batch", "length", "act_mlp"), self.rules)
        return self.down(h_BTF)
