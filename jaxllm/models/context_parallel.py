"""Context parallelism: attention over a sequence split across the devices of one mesh axis.

Every device holds a chunk of the sequence (queries, keys, values, positions, segment ids); masks come from the
positions and segment ids, so any layout works: contiguous chunks, or the causal load-balancing "zigzag" layout
(`zigzag_order`) where device i holds chunks i and 2n - 1 - i of 2n. Two ways to see the other devices' keys:

- `allgather`: gather every chunk's keys and values, attend locally (simple; best with few kv heads);
- `ring`: pass key/value chunks around the ring with `ppermute`, n steps, each step attending to the chunk at
  hand and merging it into the running result by log-sum-exp (memory of one chunk, not the whole sequence).

Both are differentiable (the ring's backward passes the chunks the other way). Letters: B batch, T local query
positions, S key positions of one chunk, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxllm.models.attention import _MASKED, attention_mask


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """Positions [length] in the order a sequence split into `devices` contiguous pieces should hold them so
    that causal work is balanced: 2 * devices chunks, device i gets chunks i and 2 * devices - 1 - i."""
    if length % (2 * devices):
        raise ValueError(f"zigzag: sequence length {length} must be a multiple of 2 x {devices} devices")
    chunks = np.arange(length).reshape(2 * devices, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * devices - 1 - i]]) for i in range(devices)])


def _block(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, scale):
    """One chunk's unnormalised attention: (running max [B, K, G, T], sum of exp [B, K, G, T], out [B, K, G, T, H])."""
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, _MASKED)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    o_BKGTH = jnp.einsum("bkgts,bskh->bkgth", p_BKGTS, v_BSKH.astype(jnp.float32))
    return m_BKGT, jnp.sum(p_BKGTS, axis=-1), o_BKGTH


def _merge(a, b):
    """Log-sum-exp merge of two partial results (m, l, o)."""
    (m1, l1, o1), (m2, l2, o2) = a, b
    m = jnp.maximum(m1, m2)
    w1, w2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, l1 * w1 + l2 * w2, o1 * w1[..., None] + o2 * w2[..., None]


def _local(q_BTNH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, *, axis, method, causal, window, scale):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    mask = partial(attention_mask, qpos_BT, q_segment_ids_BT=qseg_BT, causal=causal, sliding_window=window)
    if method == "allgather":
        gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
        k_all, v_all, kpos, kseg = map(gather, (k_BSKH, v_BSKH, kpos_BS, kseg_BS))
        m, l, o = _block(q_BTKGH, k_all, v_all, mask(kpos, kv_segment_ids_BS=kseg), scale)
    else:
        n = jax.lax.axis_size(axis)
        shift = partial(jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % n) for i in range(n)])

        def step(carry, _):
            acc, chunk = carry
            k, v, kpos, kseg = chunk
            acc = _merge(acc, _block(q_BTKGH, k, v, mask(kpos, kv_segment_ids_BS=kseg), scale))
            return (acc, jax.tree.map(shift, chunk)), None

        chunk = (k_BSKH, v_BSKH, kpos_BS, kseg_BS)
        first = _block(q_BTKGH, k_BSKH, v_BSKH, mask(kpos_BS, kv_segment_ids_BS=kseg_BS), scale)
        (acc, _), _ = jax.lax.scan(step, (first, jax.tree.map(shift, chunk)), None, length=n - 1)
        m, l, o = acc
    out_BKGTH = o / l[..., None]
    return jnp.einsum("bkgth->btkgh", out_BKGTH).reshape(B, T, N, H).astype(q_BTNH.dtype)


def context_parallel_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    method: str = "ring",
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """softmax(q k^T * scale, masked by positions / segments / causality / window) v with the sequence (T) split
    over mesh axis `axis`; `method`: ring | allgather. Arrays are global; returns [B, T, N, H] split like q."""
    if method not in ("ring", "allgather"):
        raise ValueError(f"context parallel method {method!r}: choose ring or allgather")
    scale = 1.0 / float(np.sqrt(q_BTNH.shape[-1])) if scale is None else scale
    seq3, seq2 = PartitionSpec(None, axis, None, None), PartitionSpec(None, axis)
    local = partial(_local, axis=axis, method=method, causal=causal, window=sliding_window, scale=scale)
    return jax.shard_map(
        lambda q, k, v, pos, seg: local(q, k, v, pos, pos, seg, seg), mesh=mesh,
        in_specs=(seq3, seq3, seq3, seq2, seq2), out_specs=seq3,
    )(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT)
