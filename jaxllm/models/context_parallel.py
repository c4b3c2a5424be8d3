"""Context parallelism: attention over a sequence split across the devices of the mesh axes `length` maps to
(`jaxllm.sharding.split_axes("length", rules)`).

Every device holds a chunk of each row (queries, keys, values, positions, segment ids); masks come from the
positions and segment ids, so any layout works: contiguous chunks, or the causal load-balancing "zigzag" layout
(`zigzag_order`) where device i holds chunks i and 2n - 1 - i of 2n. Two ways to see the other devices' keys:

- `allgather`: gather every chunk's keys and values, attend locally (simple; best with few kv heads);
- `ring`: pass key/value chunks around the ring with `ppermute`, n steps, each step attending to the chunk at
  hand and merging it into the running result by log-sum-exp (memory of one chunk, not the whole sequence).

Both are differentiable (the ring's backward passes the chunks the other way). Each block's scores are
recomputed in the backward pass (`jax.checkpoint`), so no [T, S] probabilities are kept: activation memory per
device stays linear in its share of the sequence. Letters: B batch, T local query positions, S key positions of one
chunk, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxllm.models.attention_mask import MASKED, attention_mask
from jaxllm.sharding import dividing_axes

Axes = tuple[str, ...]


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """Positions [length] in the order a sequence split into `devices` contiguous pieces should hold them so
    that causal work is balanced: 2 * devices chunks, device i gets chunks i and 2 * devices - 1 - i."""
    if length % (2 * devices):
        raise ValueError(f"zigzag: sequence length {length} must be a multiple of 2 x {devices} devices")
    chunks = np.arange(length).reshape(2 * devices, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * devices - 1 - i]]) for i in range(devices)])


def to_zigzag(batch: dict[str, jax.Array], devices: int) -> dict[str, jax.Array]:
    """A batch of [B, T] arrays with every row in the zigzag order for `devices` (positions made explicit, so masks
    and RoPE see the true positions). Token-sum losses are unchanged: the targets move with their inputs."""
    B, T = batch["inputs"].shape
    order = zigzag_order(T, devices)
    full = {"positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), **batch}
    return {k: v[:, order] for k, v in full.items()}


QUERY_TILE = 256  # at most this many local query positions per block: a block's scores are [tile, S], not [T, S]


class _How(NamedTuple):
    """What a block computes besides its arrays (static)."""

    scale: float
    softcap: float | None
    causal: bool
    window: int | None


@partial(jax.checkpoint, static_argnums=(7,))
def _block(q_BTKGH, qpos_BT, qseg_BT, k_BSKH, v_BSKH, kpos_BS, kseg_BS, how: _How):
    """One chunk's unnormalised attention: (running max [B, K, G, T], sum of exp [B, K, G, T], out [B, K, G, T, H]).
    Recomputed in the backward pass: its [T, S] scores are never kept."""
    mask_BTS = attention_mask(qpos_BT, kpos_BS, qseg_BT, kseg_BS, causal=how.causal, sliding_window=how.window)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * how.scale
    if how.softcap is not None:
        s_BKGTS = how.softcap * jnp.tanh(s_BKGTS / how.softcap)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, MASKED)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    o_BKGTH = jnp.einsum("bkgts,bskh->bkgth", p_BKGTS, v_BSKH.astype(jnp.float32))
    return m_BKGT, jnp.sum(p_BKGTS, axis=-1), o_BKGTH


def _tiled_block(q_BTKGH, qpos_BT, qseg_BT, kv, how: _How):
    """`_block` against one chunk `kv` = (k, v, positions, segment ids) over query tiles of at most QUERY_TILE
    positions, one after another (`lax.map`)."""
    T = q_BTKGH.shape[1]
    tile = next(t for t in range(min(T, QUERY_TILE), 0, -1) if T % t == 0)
    if tile == T:
        return _block(q_BTKGH, qpos_BT, qseg_BT, *kv, how)
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], T // tile, tile, *x.shape[2:]), 1, 0)  # [tiles, B, tile, ...]
    parts = jax.lax.map(lambda qs: _block(*qs, *kv, how), (split(q_BTKGH), split(qpos_BT), split(qseg_BT)))
    join = lambda x: (y := jnp.moveaxis(x, 0, 3)).reshape(*y.shape[:3], T, *y.shape[5:])  # [tiles, B, K, G, tile, ...]
    return tuple(join(x) for x in parts)


def _merge(a, b):
    """Log-sum-exp merge of two partial results (m, l, o)."""
    (m1, l1, o1), (m2, l2, o2) = a, b
    m = jnp.maximum(m1, m2)
    w1, w2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, l1 * w1 + l2 * w2, o1 * w1[..., None] + o2 * w2[..., None]


def _local(q_BTNH, k_BSKH, v_BSKH, pos_BT, seg_BT, *, axis, method, how: _How):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    block = lambda *kv: _tiled_block(q_BTKGH, pos_BT, seg_BT, kv, how)
    if method == "allgather":
        gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
        m, l, o = block(*map(gather, (k_BSKH, v_BSKH, pos_BT, seg_BT)))
    else:
        n = jax.lax.axis_size(axis)
        shift = partial(jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % n) for i in range(n)])

        def step(carry, _):
            acc, chunk = carry
            return (_merge(acc, block(*chunk)), jax.tree.map(shift, chunk)), None

        chunk = (k_BSKH, v_BSKH, pos_BT, seg_BT)
        (acc, _), _ = jax.lax.scan(step, (block(*chunk), jax.tree.map(shift, chunk)), None, length=n - 1)
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
    axis: str | Axes = "sequence",
    method: str = "ring",
    causal: bool = True,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    batch_axes: Axes = (),
    head_axes: Axes = (),
) -> jax.Array:
    """softmax(q k^T * scale, soft-capped, masked by positions / segments / causality / window) v with each row's
    positions (T) split over mesh axis `axis` of the current mesh; `method`: ring | allgather. Rows may also be split
    over `batch_axes` and kv heads over `head_axes` (those of them that divide B and K). Arrays are global; returns
    [B, T, N, H] split like q."""
    if method not in ("ring", "allgather"):
        raise ValueError(f"context parallel method {method!r}: choose ring or allgather")
    scale = 1.0 / float(np.sqrt(q_BTNH.shape[-1])) if scale is None else scale
    spec = lambda axes: (tuple(axes) or None) if not isinstance(axes, str) else axes
    rows = dividing_axes(batch_axes, q_BTNH.shape[0])
    heads = dividing_axes(tuple(a for a in head_axes if a not in rows), k_BTKH.shape[2])
    seq3 = PartitionSpec(spec(rows), spec(axis), spec(heads), None)
    seq2 = PartitionSpec(spec(rows), spec(axis))
    local = partial(_local, axis=axis, method=method, how=_How(scale, logit_softcap, causal, sliding_window))
    return jax.shard_map(local, in_specs=(seq3, seq3, seq3, seq2, seq2), out_specs=seq3)(
        q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT)
