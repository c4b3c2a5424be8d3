"""Sparse upcycling (Komatsuzaki et al., 2022): an MoE model started from a dense checkpoint.

Every expert is a copy of the dense FFN of its layer and the router starts fresh (normal, init_std, f32),
so the upcycled model first computes exactly the dense model's function (the top-k weights sum to 1 and
all experts agree); training then lets the experts drift apart. Everything else is carried over as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError, ModelConfig


def upcycle(dense_params: Any, dense_cfg: ModelConfig, moe_cfg: ModelConfig, key: jax.Array) -> Any:
    """MoE params for `moe_cfg` from `dense_params` of `dense_cfg` (which must be the same model with a
    dense gated FFN whose width is the expert width)."""
    m = moe_cfg.moe
    expected = dataclasses.replace(dense_cfg, moe=m)
    if dense_cfg.moe.num_experts or not m.num_experts:
        raise ConfigError("upcycling goes from a dense model (moe.num_experts=0) to an MoE one (num_experts > 0)")
    if expected != moe_cfg:
        diff = sorted(k for k in vars(moe_cfg) if getattr(moe_cfg, k) != getattr(expected, k))
        raise ConfigError(f"upcycling changes only model.moe; the MoE config also differs from the dense one in {diff}")
    mlp = dense_cfg.mlp
    if not mlp.gated or mlp.structure != "dense" or (m.d_ff or mlp.d_ff) != mlp.d_ff or m.shared_experts or m.every != 1:
        raise ConfigError("upcycling needs a dense gated FFN of the expert width (moe.d_ff unset or = mlp.d_ff), "
                          "no shared experts and MoE in every layer (moe.every=1)")
    if m.router != "linear":
        raise ConfigError("upcycling initialises a linear router (moe.router=linear)")
    dense_mlp = dense_params["blocks"]["mlp"]
    E, L, D = m.num_experts, dense_cfg.num_layers, dense_cfg.d_model
    copies = {name: jnp.repeat(dense_mlp[name]["kernel"][:, None], E, axis=1) for name in ("gate", "up", "down")}
    router = moe_cfg.init_std * jax.random.normal(key, (L, D, E + m.null_experts), jnp.float32)
    blocks = {**dense_params["blocks"], "mlp": {**copies, "router": router}}
    return {**dense_params, "blocks": blocks}
