"""Sparse mixture-of-experts FFN: a top-k softmax router (f32) over SwiGLU experts, two dispatch paths.

    dropless   assignments sorted by expert, experts run as grouped matmuls (`kernels_pallas.grouped_matmul`:
               Pallas gmm/tgmm on GPU/TPU, `lax.ragged_dot` on CPU); nothing is dropped
    capacity   each expert takes at most C = capacity_factor * M * P / E assignments (M tokens, P = top_k; GShard/Switch
               priority: all first choices before any second choice, in token order), gathered into
               [E, C] slots and run as one batched matmul; overflow is dropped and reported

With no overflow both compute the same function. Null experts (AdaMoE) are router slots with zero output
and zero compute: a token choosing one uses fewer real experts. Shared experts are one always-on dense FFN.
Each call returns the output and `MoeStats` (aux losses and routing metrics) for the loss and tensorboard.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, _default_rules
from jaxllm.models.expert_parallel import expert_axes, experts_expert_parallel
from jaxllm.models.layers import make_param
from jaxllm.models.pregate_router import unit_weights
from jaxllm.sharding import Rules, make_rules

_DEFAULT_RULES = make_rules(_default_rules())


class MoeStats(NamedTuple):
    load_balance_loss: jax.Array  # scalar: slots * sum_e f_e P_e (1 when perfectly balanced)
    router_z_loss: jax.Array  # scalar: mean logsumexp(logits)^2
    expert_load: jax.Array  # [E + null]: share of assignments per router slot
    drop_fraction: jax.Array  # scalar: capacity path: share of real-expert assignments dropped; expert choice: share of tokens no expert took
    router_entropy: jax.Array  # scalar: mean entropy of the router distribution (nats)
    expert_flops: jax.Array  # scalar: matmul FLOPs spent in routed experts (null experts cost none)
    expert_MP: jax.Array  # int32 [M, P]: each token's chosen router slots, first choice first (routing diagnostics)
    dropped_MP: jax.Array  # bool [M, P]: the choice went to a real expert that did not run it (capacity overflow;
    #                        expert choice: no expert took the token)


class Routing(NamedTuple):
    expert_MP: jax.Array  # int32 [M, P]: chosen router slots (>= num_experts: a null expert)
    weight_MP: jax.Array  # f32 [M, P]: renormalised over the k choices
    probs_MZ: jax.Array  # f32 [M, Z]
    logits_MZ: jax.Array


def route(x_MD: jax.Array, router_DZ: jax.Array, top_k: int, normalize: bool = True) -> Routing:
    """Top-k of the softmax over router slots, in f32, weights renormalised over the chosen k (or not)."""
    return route_logits(jnp.dot(x_MD.astype(jnp.float32), router_DZ.astype(jnp.float32)), top_k, normalize)


def route_logits(logits: jax.Array, top_k: int, normalize: bool = True) -> Routing:
    """`route` from router logits [M, Z] (f32)."""
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if normalize else top_p
    return Routing(top_i.astype(jnp.int32), weights, probs, logits)


def load_balance_loss(expert_MP: jax.Array, probs_MZ: jax.Array) -> jax.Array:
    """Switch Transformer's loss: slots * sum_s f_s P_s, f_s the share of assignments to slot s, P_s its
    mean router probability."""
    slots = probs_MZ.shape[-1]
    f = jnp.mean(jax.nn.one_hot(expert_MP, slots, dtype=jnp.float32).sum(axis=1), axis=0) / expert_MP.shape[1]
    return slots * jnp.sum(f * jnp.mean(probs_MZ, axis=0))


def routing_stats(r: Routing, drop_fraction: jax.Array, expert_flops: jax.Array, balanced: bool = False,
                  dropped_MP: jax.Array | None = None) -> MoeStats:
    """A layer's MoeStats from its routing. `balanced` (expert choice: every expert takes the same number of
    tokens): no balancing loss, uniform load. `dropped_MP`: which choices did not run (None: all ran)."""
    M, P = r.expert_MP.shape
    slots = r.probs_MZ.shape[-1]
    return MoeStats(
        load_balance_loss=jnp.zeros((), jnp.float32) if balanced else load_balance_loss(r.expert_MP, r.probs_MZ),
        router_z_loss=jnp.mean(jnp.square(jax.nn.logsumexp(r.logits_MZ, axis=-1))),
        expert_load=jnp.full((slots,), 1.0 / slots) if balanced
        else jnp.mean(jax.nn.one_hot(r.expert_MP, slots, dtype=jnp.float32).sum(1), axis=0) / P,
        drop_fraction=drop_fraction,
        router_entropy=-jnp.mean(jnp.sum(r.probs_MZ * jnp.log(r.probs_MZ + 1e-9), axis=-1)),
        expert_flops=expert_flops,
        expert_MP=r.expert_MP,
        dropped_MP=jnp.zeros(r.expert_MP.shape, bool) if dropped_MP is None else dropped_MP,
    )


def _swiglu(x, gate, up, down, mm):
    return mm(jax.nn.silu(mm(x, gate)) * mm(x, up), down)


def grouped_experts(x_AD, expert_A, gate_EDF, up_EDF, down_EFD, impl: str) -> jax.Array:
    """Row r through expert expert_A[r] as grouped matmuls over rows sorted by expert; rows tagged >= E
    (null experts, padding) sort last, past every group, and come back as zeros. [A, D] in row order."""
    from kernels_pallas.grouped_matmul import gmm

    E = gate_EDF.shape[0]
    order = jnp.argsort(expert_A, stable=True)
    group_sizes = jnp.bincount(expert_A, length=E).astype(jnp.int32)
    mm = lambda a, w: gmm(a, w, group_sizes, impl=impl)
    out_AD = _swiglu(x_AD[order], gate_EDF, up_EDF, down_EFD, mm)
    out_AD = jnp.where((expert_A[order] < E)[:, None], out_AD, 0)
    return jnp.zeros_like(out_AD).at[order].set(out_AD)


def experts_dropless(x_MD, r: Routing, gate_EDF, up_EDF, down_EFD, impl: str) -> jax.Array:
    """Every (token, choice) assignment through its expert: [M, D] f32."""
    M, P = r.expert_MP.shape
    out_AD = grouped_experts(jnp.repeat(x_MD, P, axis=0), r.expert_MP.reshape(-1), gate_EDF, up_EDF, down_EFD, impl)
    return jnp.sum((out_AD.astype(jnp.float32) * r.weight_MP.reshape(-1, 1)).reshape(M, P, -1), axis=1)


def experts_capacity(x_MD, r: Routing, gate_EDF, up_EDF, down_EFD, capacity: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(output [M, D] f32, dropped share, dropped choices bool [M, P]): assignments gathered into [E, capacity]
    slots, experts run as one batched matmul, results gathered back (index gathers, linear in M; one-hot einsums
    would be quadratic)."""
    M, P = r.expert_MP.shape
    E = gate_EDF.shape[0]
    e_A = r.expert_MP.T.reshape(P * M)  # choice-major: all first choices before any second choice
    onehot_AE = jax.nn.one_hot(e_A, E, dtype=jnp.int32)  # null slots -> all zeros
    position_A = jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=1)
    kept_A = (e_A < E) & (position_A < capacity)
    slot_A = jnp.where(kept_A, e_A * capacity + position_A, E * capacity)  # the last slot: a dump
    token_A = jnp.tile(jnp.arange(M), P)
    token_of_slot = jnp.full((E * capacity + 1,), M, jnp.int32).at[slot_A].set(token_A)[:-1]
    x_ECD = jnp.concatenate([x_MD, jnp.zeros((1, x_MD.shape[1]), x_MD.dtype)])[token_of_slot].reshape(E, capacity, -1)
    mm = lambda a, w: jnp.einsum("ecd,edf->ecf", a, w)
    out_ECD = _swiglu(x_ECD, gate_EDF, up_EDF, down_EFD, mm).astype(jnp.float32)
    out_AD = jnp.concatenate([out_ECD.reshape(E * capacity, -1), jnp.zeros((1, out_ECD.shape[2]), jnp.float32)])[slot_A]
    y = jnp.zeros((M, x_MD.shape[1]), jnp.float32).at[token_A].add(out_AD * r.weight_MP.T.reshape(P * M, 1))
    routed = jnp.maximum(jnp.sum(e_A < E), 1)
    dropped_MP = ((e_A < E) & ~kept_A).reshape(P, M).T
    return y, 1.0 - jnp.sum(kept_A) / routed, dropped_MP


def experts_expert_choice(x_MD, probs_ME, gate_EDF, up_EDF, down_EFD, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Expert-choice routing (Zhou et al., 2022): each expert takes the `capacity` tokens with the highest
    router probability for it; a token's output sums prob x expert(x) over the experts that took it.
    (output [M, D] f32, which tokens no expert took bool [M]). The choice looks at every token of the batch,
    later ones included: a decoder trained this way routes differently when decoding token by token."""
    M = x_MD.shape[0]
    gates_EC, token_EC = jax.lax.top_k(probs_ME.T, min(capacity, M))
    mm = lambda a, w: jnp.einsum("ecd,edf->ecf", a, w)
    out_ECD = _swiglu(x_MD[token_EC], gate_EDF, up_EDF, down_EFD, mm).astype(jnp.float32)
    y = jnp.zeros((M, x_MD.shape[1]), jnp.float32).at[token_EC.reshape(-1)].add(
        (out_ECD * gates_EC[..., None]).reshape(-1, x_MD.shape[1]))
    taken = jnp.zeros((M,), jnp.int32).at[token_EC.reshape(-1)].add(1)
    return y, taken == 0


class MoeFfn(nnx.Module):
    """[B, T, D] (+ router state [B, T, U]: a recurrent router's, or the pre-gating router's logits [B, T, Z]) ->
    ([B, T, D], MoeStats, router state or None).
    Experts: gate/up [E, D, F], down [E, F, D] (axis `expert`)."""

    def __init__(self, cfg: ModelConfig, rules: Rules = _DEFAULT_RULES, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg, self.rules = cfg, rules
        D, F, E = cfg.d_model, m.d_ff or cfg.mlp.d_ff, m.num_experts
        pdt = jnp.dtype(cfg.param_dtype)
        normal = nnx.initializers.normal
        if m.router == "recurrent":
            from jaxllm.models.recurrent_router import RecurrentRouter

            self.router = RecurrentRouter(D, m.router_state_dim, E + m.null_experts, cfg.init_std, rngs=rngs)
        elif m.router == "linear":
            self.router = make_param(rngs, normal(cfg.init_std), (D, E + m.null_experts), ("embed", None), jnp.float32)
        down_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.gate = make_param(rngs, normal(cfg.init_std), (E, D, F), ("expert", "embed", "mlp"), pdt)
        self.up = make_param(rngs, normal(cfg.init_std), (E, D, F), ("expert", "embed", "mlp"), pdt)
        self.down = make_param(rngs, normal(down_std), (E, F, D), ("expert", "mlp", "embed"), pdt)
        if m.shared_experts:
            from dataclasses import replace

            from jaxllm.models.mlp import Mlp

            width = m.shared_d_ff or F * m.shared_experts
            shared_cfg = replace(cfg, mlp=replace(cfg.mlp, d_ff=width, structure="dense", guide_fraction=0.0))
            self.shared = Mlp(shared_cfg, rules, rngs=rngs)
        else:
            self.shared = None
        self.shared_gate = make_param(rngs, normal(cfg.init_std), (D, 1), ("embed", None), pdt) if m.shared_gate else None

    def capacity(self, tokens: int) -> int:
        m = self.cfg.moe
        return max(1, math.ceil(m.capacity_factor * tokens * m.top_k / m.num_experts))

    def __call__(self, x_BTD: jax.Array, router_state_BTU: jax.Array | None = None
                 ) -> tuple[jax.Array, MoeStats, jax.Array | None]:
        m, dtype = self.cfg.moe, jnp.dtype(self.cfg.dtype)
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D).astype(dtype)
        state = None
        if m.router == "recurrent":
            h = jnp.zeros((B * T, m.router_state_dim), jnp.float32) if router_state_BTU is None else router_state_BTU.reshape(B * T, -1)
            logits, h = self.router(x_MD, h)
            state = h.reshape(B, T, -1)
        elif m.router == "pregate":  # the logits of the router before the layer stack, carried unchanged
            logits, state = router_state_BTU.reshape(B * T, -1), router_state_BTU
        else:
            logits = jnp.dot(x_MD.astype(jnp.float32), self.router[...])
        r = route_logits(logits, m.top_k, m.normalize_top_k)
        if m.router == "pregate":
            r = r._replace(weight_MP=unit_weights(jnp.take_along_axis(r.probs_MZ, r.expert_MP, axis=1)))
        dispatched = r  # what the experts run: the chosen assignments
        if m.router == "pregate" and m.router_grad == "all":  # every slot runs; the unchosen at weight 0
            Z = r.probs_MZ.shape[1]
            chosen_MZ = jnp.sum(jax.nn.one_hot(r.expert_MP, Z, dtype=jnp.float32), axis=1)
            dispatched = r._replace(expert_MP=jnp.broadcast_to(jnp.arange(Z, dtype=jnp.int32), r.probs_MZ.shape),
                                    weight_MP=chosen_MZ + r.probs_MZ - jax.lax.stop_gradient(r.probs_MZ))
        weights = [w[...].astype(dtype) for w in (self.gate, self.up, self.down)]
        E, F = weights[0].shape[0], weights[0].shape[2]
        ep_axes = expert_axes(self.rules, E) if m.dispatch == "dropless" else ()
        dropped_MP = None  # dropless: every choice runs
        if ep_axes:
            run = lambda x_AD, e_A, w: grouped_experts(x_AD, e_A, *w, m.impl)
            y = experts_expert_parallel(x_BTD.astype(dtype), dispatched.expert_MP.reshape(B, T, -1),
                                        dispatched.weight_MP.reshape(B, T, -1), tuple(weights), self.rules, ep_axes,
                                        run).reshape(B * T, D)
            real = jnp.sum(dispatched.expert_MP < E)
            dropped = jnp.zeros((), jnp.float32)
        elif m.routing == "expert_choice":
            y, untaken_M = experts_expert_choice(x_MD, r.probs_MZ, *weights, self.capacity(B * T))
            dropped, dropped_MP = jnp.mean(untaken_M), jnp.broadcast_to(untaken_M[:, None], r.expert_MP.shape)
            real = jnp.asarray(E * min(self.capacity(B * T), B * T))
        elif m.dispatch == "dropless":
            y = experts_dropless(x_MD, dispatched, *weights, m.impl)
            real = jnp.sum(dispatched.expert_MP < E)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y, dropped, dropped_MP = experts_capacity(x_MD, r, *weights, self.capacity(B * T))
            real = jnp.sum(r.expert_MP < E) * (1 - dropped)
        if self.shared is not None:
            shared = self.shared(x_MD.reshape(B, T, D)).reshape(B * T, D).astype(jnp.float32)  # [B, T, D]: its constraints
            if self.shared_gate is not None:
                shared = jax.nn.sigmoid(jnp.dot(x_MD, self.shared_gate[...].astype(dtype)).astype(jnp.float32)) * shared
            y = y + shared
        stats = routing_stats(r, dropped, real.astype(jnp.float32) * 2 * 3 * D * F,
                              balanced=m.routing == "expert_choice", dropped_MP=dropped_MP)
        return y.astype(dtype).reshape(B, T, D), stats, state
