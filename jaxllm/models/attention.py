"""Multi-head attention (MHA/GQA/MQA) with RoPE, QK-norm, sliding window, soft-cap and packing.

All attention math goes through `attend`, which dispatches on `impl` (xla, pallas flash attention, cudnn).
Masking is by positions and segment ids: query i sees key j iff they share a segment id,
pos_j <= pos_i and (with a window W) pos_i - pos_j < W. Segment id 0 is conventionally padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.attention_mask import MASKED, attention_mask
from jaxllm.models.context_parallel import context_parallel_attention
from jaxllm.models.kv_cache import LayerCache, write_slots
from jaxllm.models.layers import Dense, RMSNorm
from jaxllm.models.rope import apply_rope, rope_attention_factor, rope_inv_freq
from jaxllm.sharding import Rules, constrain, split_axes
from kernels_pallas.choose import attention_impl
from kernels_pallas.flash_attention import flash_attention_sharded

def attend_xla(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Reference attention as einsums; GQA without repeating kv heads. Softmax in f32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        s_BKGTS = logit_softcap * jnp.tanh(s_BKGTS / logit_softcap)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, MASKED)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def _causal_blocks(T: int, S: int, causal: bool, window: int | None) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) tiles covering every allowed (query, key) pair of a causal
    self-attention: key blocks after a query block (or before its window) are skipped entirely.
    One tile when not causal or T != S (decoding against a cache)."""
    if not causal or T != S or T < 128:
        return [(0, T, 0, S)]
    size = max(64, -(-T // 8))
    tiles = []
    for q0 in range(0, T, size):
        q1 = min(T, q0 + size)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        tiles.append((q0, q1, k0, q1))
    return tiles


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    q_positions_BT: jax.Array,
    kv_positions_BS: jax.Array,
    q_segment_ids_BT: jax.Array,
    kv_segment_ids_BS: jax.Array,
    causal: bool = True,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    impl: str = "xla",
    rules: Rules = (),
    packed: bool = True,
    context_parallel: str = "ring",
) -> jax.Array:
    """softmax(q k^T * scale [soft-capped, masked]) v -> [B, T, N, H]. N must be a multiple of K.

    `impl`: xla (einsums, below), pallas (the flash attention kernel of kernels_pallas, sharded over the
    current mesh's batch/head axes by `rules`; interpret mode on CPU), cudnn (jax.nn.dot_product_attention
    on a CUDA GPU), auto (`kernels_pallas.choose.attention_impl`: cudnn on GPU for unpacked rows without
    window or soft-cap, else pallas on GPU/TPU; xla on CPU and for decoding). `packed`: the rows may hold
    several documents (segment ids given by the caller). With each row's positions split over mesh axes (`length`'s
    rule; `mesh.sequence` > 1), self-attention runs context-parallel (`context_parallel`: ring | allgather) with XLA
    blocks, whatever `impl` says.

    With `causal` and T == S (self-attention), key index j > query index i is never attended, so
    positions must not decrease within a segment (true of packed rows and left padding with
    clipped positions alike, up to the outputs at padding, which carry no loss).
    """
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
    self_attention = q_BTNH.shape[1] == k_BSKH.shape[1]
    if self_attention and (seq_axes := split_axes("length", rules)):
        table = dict(rules)
        return context_parallel_attention(
            q_BTNH, k_BSKH, v_BSKH, q_positions_BT, q_segment_ids_BT, axis=seq_axes, method=context_parallel,
            causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale,
            batch_axes=table.get("batch", ()), head_axes=table.get("act_kv_heads", ()))
    impl = attention_impl(impl, self_attention=self_attention, packed=packed, window=sliding_window is not None,
                          softcap=logit_softcap is not None)
    kw = dict(q_positions=q_positions_BT, kv_positions=kv_positions_BS, q_segment_ids=q_segment_ids_BT,
              kv_segment_ids=kv_segment_ids_BS, causal=causal, sliding_window=sliding_window,
              logit_softcap=logit_softcap, scale=scale)
    if impl == "pallas" and self_attention:  # training / full forward; decoding against a cache stays xla
        table = dict(rules)
        return flash_attention_sharded(q_BTNH, k_BSKH, v_BSKH, batch_axes=table.get("batch", ()),
                                       head_axes=table.get("act_kv_heads", ()), **kw)
    if impl == "cudnn":
        return _attend_cudnn(q_BTNH, k_BSKH, v_BSKH, packed=packed, **kw)
    outs = []
    for q0, q1, k0, k1 in _causal_blocks(q_BTNH.shape[1], k_BSKH.shape[1], causal, sliding_window):
        mask_BTS = attention_mask(
            q_positions_BT[:, q0:q1], kv_positions_BS[:, k0:k1], q_segment_ids_BT[:, q0:q1],
            kv_segment_ids_BS[:, k0:k1], causal=causal, sliding_window=sliding_window,
        )
        outs.append(attend_xla(q_BTNH[:, q0:q1], k_BSKH[:, k0:k1], v_BSKH[:, k0:k1], mask_BTS,
                               scale=scale, logit_softcap=logit_softcap))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _attend_cudnn(q_BTNH, k_BSKH, v_BSKH, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
                  sliding_window, logit_softcap, scale, packed: bool) -> jax.Array:
    """cuDNN's fused attention through `jax.nn.dot_product_attention`: its own causal mask for unpacked
    rows without a window, else jaxllm's mask as a dense boolean [B, 1, T, S] mask."""
    if jax.devices()[0].platform not in ("gpu", "cuda"):
        raise ValueError("attention.impl=cudnn needs a CUDA GPU; use xla, pallas or auto here")
    if logit_softcap is not None:
        raise ValueError("attention.impl=cudnn has no logit soft-cap; use pallas or xla")
    if not packed and sliding_window is None and q_BTNH.shape[1] == k_BSKH.shape[1]:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=causal,
                                            implementation="cudnn")
    mask_B1TS = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal,
                               sliding_window=sliding_window)[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, scale=scale, implementation="cudnn")


class Attention(nnx.Module):
    """Projections + RoPE + `attend`. Params: q/k/v kernels [D, heads, H], o kernel [heads, H, D]."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        qkv_bias = cfg.bias in ("qkv", "all")
        self.q = Dense((D,), (N, H), ("embed", "heads", "head_dim"), use_bias=qkv_bias, std=cfg.init_std, **kw)
        self.k = Dense((D,), (K, H), ("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, std=cfg.init_std, **kw)
        self.v = Dense((D,), (K, H), ("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, std=cfg.init_std, **kw)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.o = Dense((N, H), (D,), ("heads", "head_dim", "embed"), use_bias=cfg.bias == "all", std=out_std, **kw)
        if cfg.attention.qk_norm:
            self.q_norm = RMSNorm(H, eps=cfg.norm_eps, **kw)
            self.k_norm = RMSNorm(H, eps=cfg.norm_eps, **kw)

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array,
        cache: LayerCache | None = None,
        packed: bool = True,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """[B, T, D] -> [B, T, D]. With a `cache`, this call's keys/values are written into
        cache.slots and the queries attend over the whole cache; returns (out, (k_cache, v_cache))."""
        cfg, rules = self.cfg, self.rules
        q_BTNH = constrain(self.q(x_BTD), ("batch", "length", "act_heads", "head_dim"), rules)
        k_BTKH = constrain(self.k(x_BTD), ("batch", "length", "act_kv_heads", "head_dim"), rules)
        v_BTKH = constrain(self.v(x_BTD), ("batch", "length", "act_kv_heads", "head_dim"), rules)
        if cfg.attention.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
            scale = rope_attention_factor(cfg.rope_scaling)
            q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq, scale)
            k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq, scale)
        kv_positions_BS, kv_segment_ids_BS = positions_BT, segment_ids_BT
        if cache is not None:
            k_BTKH = write_slots(cache.k, cache.slots, k_BTKH)
            v_BTKH = write_slots(cache.v, cache.slots, v_BTKH)
            kv_positions_BS, kv_segment_ids_BS = cache.positions, cache.segment_ids
        out_BTNH = attend(
            q_BTNH, k_BTKH, v_BTKH,
            q_positions_BT=positions_BT, kv_positions_BS=kv_positions_BS,
            q_segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS,
            sliding_window=cfg.attention.sliding_window, logit_softcap=cfg.attention.logit_softcap,
            impl=cfg.attention.impl, rules=rules, packed=packed, context_parallel=cfg.attention.context_parallel,
        )
        out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "head_dim"), rules)
        out_BTD = self.o(out_BTNH)
        return out_BTD if cache is None else (out_BTD, (k_BTKH, v_BTKH))
