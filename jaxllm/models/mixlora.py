"""MixLoRA (Li et al., 2024): a sparse mixture of LoRA experts on the FFN of a frozen dense model.

Every expert is the dense FFN with its own low-rank deltas on gate, up and down
(W + s A_e B_e, s = alpha / rank); a top-k router (f32, renormalised like Mixtral) picks k experts per
token and the Switch load-balancing loss keeps them in use. The dense kernels are shared: x W_gate and
x W_up run once per token, the deltas and the down map once per (token, choice), the deltas as grouped
matmuls over assignments sorted by expert. Param names of the dense FFN are kept (`mlp.gate.kernel`, ...)
so a dense checkpoint loads as is; `router` and the `*_a` / `*_b` factors are what trains (the params a dense
model lacks: `jaxllm.train.methods.added_modules`). B starts at zero: the fresh MixLoRA model computes the dense model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.layers import Dense, make_param
from jaxllm.sharding import Rules

class MixLoraFfn(nnx.Module):
    """[B, T, D] -> ([B, T, D], MoeStats, None): top-k over E LoRA experts sharing the dense SwiGLU FFN."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg, self.rules = cfg, rules
        D, F, E, r = cfg.d_model, cfg.mlp.d_ff, m.num_experts, m.lora_rank
        kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.gate = Dense((D,), (F,), ("embed", "mlp"), std=cfg.init_std, **kw)
        self.up = Dense((D,), (F,), ("embed", "mlp"), std=cfg.init_std, **kw)
        self.down = Dense((F,), (D,), ("mlp", "embed"), std=cfg.init_std / math.sqrt(2 * cfg.num_layers), **kw)
        normal, zeros, f32 = nnx.initializers.normal, nnx.initializers.zeros, jnp.float32
        self.router = make_param(rngs, normal(cfg.init_std), (D, E), ("embed", None), f32)
        for name, (i, o) in zip(("gate", "up", "down"), ((D, F), (D, F), (F, D))):
            setattr(self, f"{name}_a", make_param(rngs, normal(1 / math.sqrt(i)), (E, i, r), ("expert", None, None), f32))
            setattr(self, f"{name}_b", make_param(rngs, zeros, (E, r, o), ("expert", None, None), f32))

    def __call__(self, x_BTD: jax.Array, router_state: Any = None):
        from kernels_pallas.grouped_matmul import gmm
        from jaxllm.models.moe import route, routing_stats

        m, dtype = self.cfg.moe, jnp.dtype(self.cfg.dtype)
        B, T, D = x_BTD.shape
        P, E, s = m.top_k, m.num_experts, m.lora_alpha / m.lora_rank
        x_MD = x_BTD.reshape(B * T, D).astype(dtype)
        r = route(x_MD, self.router[...], P)
        g0_MF, u0_MF = self.gate(x_MD), self.up(x_MD)
        e_A = r.expert_MP.reshape(-1)
        order = jnp.argsort(e_A, stable=True)
        token = order // P
        sizes = jnp.bincount(e_A, length=E).astype(jnp.int32)
        delta = lambda h, name: s * gmm(gmm(h, getattr(self, f"{name}_a")[...].astype(dtype), sizes, impl=m.impl),
                                        getattr(self, f"{name}_b")[...].astype(dtype), sizes, impl=m.impl)
        x_AD = x_MD[token]
        h_AF = jax.nn.silu(g0_MF[token] + delta(x_AD, "gate")) * (u0_MF[token] + delta(x_AD, "up"))
        out_AD = (self.down(h_AF) + delta(h_AF, "down")).astype(jnp.float32) * r.weight_MP.reshape(-1)[order][:, None]
        y = jnp.zeros((B * T, D), jnp.float32).at[token].add(out_AD)
        F, rank = self.cfg.mlp.d_ff, m.lora_rank
        flops = jnp.float32(B * T * P * 2 * (F * D + 3 * rank * (D + F)))  # down map + deltas per choice
        return y.astype(dtype).reshape(B, T, D), routing_stats(r, jnp.zeros((), jnp.float32), flops), None
