"""Flash attention, forward and backward, as Pallas kernels (online softmax, logsumexp saved).

    out_BTNH = flash_attention(q_BTNH, k_BSKH, v_BSKH, q_positions=..., kv_positions=...,
                               q_segment_ids=..., kv_segment_ids=..., causal=True)

Masking is jaxllm's (`attention_reference`): query t sees key s iff they share a segment id, and
pos_s <= pos_t (causal) and pos_t - pos_s < window; scores are optionally soft-capped. GQA/MQA read
the shared kv head through the index map, never repeating it. Sequence lengths are padded to the block
sizes inside (padded keys are masked by a segment id no query has).

Kernels run one (batch, head, query block) per program and loop over key blocks; with `causal` and
T == S they skip key blocks after the query block (and, with a window, those before it), which
assumes positions advance one per index within a segment, as in packed rows. The backward pass is two
kernels (FlashAttention-2): dq over key blocks per query block, and dk/dv over query blocks and the
query heads of a kv head per key block. `interpret=True` runs them on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.backend import check_tile, compiler_params, resolve, row_tile

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows stay NaN-free
_Q_PAD, _KV_PAD = -1, -2  # segment ids of padding: they never match each other or a real id


class Mask(NamedTuple):
    causal: bool
    window: int | None
    softcap: float | None
    scale: float


def attention_reference(
    q_BTNH, k_BSKH, v_BSKH, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
    causal: bool = True, sliding_window: int | None = None, logit_softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The pure-JAX reference: materialised [B, N, T, S] scores, softmax in f32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    k_BSNH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSNH = jnp.repeat(v_BSKH, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    mask = _mask(q_positions[:, None, :, None], kv_positions[:, None, None, :], q_segment_ids[:, None, :, None],
                 kv_segment_ids[:, None, None, :], causal, sliding_window)
    p = jax.nn.softmax(jnp.where(mask, s, MASKED), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p.astype(v_BSKH.dtype), v_BSNH)


def _mask(q_pos, k_pos, q_seg, k_seg, causal: bool, window: int | None) -> jax.Array:
    mask = q_seg == k_seg
    if causal:
        mask &= q_pos >= k_pos
    if window is not None:
        mask &= jnp.abs(q_pos - k_pos) < window
    return mask


def _scores(q, k, qpos, kpos, qseg, kseg, m: Mask):
    """Raw scores [bq, bk] in f32 (before masking), soft-capped scores, and the mask."""
    raw = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * m.scale
    capped = m.softcap * jnp.tanh(raw / m.softcap) if m.softcap is not None else raw
    mask = _mask(qpos[:, None], kpos[None, :], qseg[:, None], kseg[None, :], m.causal, m.window)
    return raw, capped, mask


def _kv_range(qi, bq: int, bk: int, num_kv: int, m: Mask, self_attention: bool):
    """Key blocks [lo, hi) that can hold keys a query block attends to."""
    if not (m.causal and self_attention):
        return 0, num_kv
    hi = lax.div((qi + 1) * bq + bk - 1, bk)
    lo = 0 if m.window is None else lax.max(0, lax.div(qi * bq - m.window + 1, bk))
    return lo, lax.min(hi, num_kv)


def _q_range(kj, bq: int, bk: int, num_q: int, m: Mask, self_attention: bool):
    """Query blocks [lo, hi) that can attend to a key block."""
    if not (m.causal and self_attention):
        return 0, num_q
    lo = lax.div(kj * bk, bq)
    hi = num_q if m.window is None else lax.min(num_q, lax.div((kj + 1) * bk + m.window - 1 + bq - 1, bq))
    return lo, hi


def _fwd_kernel(qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, m: Mask,
                bq: int, bk: int, self_attention: bool):
    qi = pl.program_id(2)
    q, qpos, qseg = q_ref[...], qpos_ref[0, :], qseg_ref[0, :]
    num_kv = k_ref.shape[0] // bk

    def body(j, carry):
        acc, m_i, l_i = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        _, s, mask = _scores(q, k_ref[ks, :], qpos, kpos_ref[0, ks], qseg, kseg_ref[0, ks], m)
        s = jnp.where(mask, s, MASKED)
        m_new = jnp.maximum(m_i, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m_i - m_new)
        v = v_ref[ks, :]
        acc = corr[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, corr * l_i + p.sum(axis=-1)

    lo, hi = _kv_range(qi, bq, bk, num_kv, m, self_attention)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(lo, hi, body, init)
    l_safe = jnp.where(l_i == 0, 1.0, l_i)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[0, :] = m_i + jnp.log(l_safe)


def _dq_kernel(qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               m: Mask, bq: int, bk: int, self_attention: bool):
    qi = pl.program_id(2)
    q, do, qpos, qseg = q_ref[...], do_ref[...], qpos_ref[0, :], qseg_ref[0, :]
    lse, delta = lse_ref[0, :], delta_ref[0, :]
    num_kv = k_ref.shape[0] // bk

    def body(j, dq):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        raw, s, mask = _scores(q, k, qpos, kpos_ref[0, ks], qseg, kseg_ref[0, ks], m)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = _dscores(p, dp, delta, raw, m)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    lo, hi = _kv_range(qi, bq, bk, num_kv, m, self_attention)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * m.scale).astype(dq_ref.dtype)


def _dscores(p, dp, delta, raw, m: Mask):
    """d loss / d raw scores from the softmax backward (and the soft-cap's tanh derivative)."""
    ds = p * (dp - delta[:, None])
    if m.softcap is not None:
        ds = ds * (1.0 - jnp.square(jnp.tanh(raw / m.softcap)))
    return ds


def _dkv_kernel(qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, m: Mask, bq: int, bk: int, self_attention: bool):
    kj = pl.program_id(2)
    k, v, kpos, kseg = k_ref[...], v_ref[...], kpos_ref[0, :], kseg_ref[0, :]
    groups, T = q_ref.shape[0], q_ref.shape[1]

    def body(i, carry):
        dk, dv = carry
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        qpos, qseg = qpos_ref[0, qs], qseg_ref[0, qs]
        for g in range(groups):  # the query heads sharing this kv head
            q, do = q_ref[g, qs, :], do_ref[g, qs, :]
            raw, s, mask = _scores(q, k, qpos, kpos, qseg, kseg, m)
            p = jnp.where(mask, jnp.exp(s - lse_ref[g, 0, qs][:, None]), 0.0)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = _dscores(p, dp, delta_ref[g, 0, qs], raw, m)
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dk, dv

    lo, hi = _q_range(kj, bq, bk, T // bq, m, self_attention)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * m.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(B, N, K, T, S, H, bq, bk):
    """BlockSpecs over grid (batch, head, query block) for [B, N, T, H] q, [B, K, S, H] kv, [B, 1, T]
    positions / segment ids and [B, N, 1, T] row statistics (the unit dims keep every block's last two dims
    whole or tiles, as Mosaic TPU requires)."""
    G = N // K
    sq = pl.Squeezed()
    return dict(
        qpos=pl.BlockSpec((sq, 1, bq), lambda b, n, i: (b, 0, i)),
        kpos=pl.BlockSpec((sq, 1, S), lambda b, n, i: (b, 0, 0)),
        q=pl.BlockSpec((sq, sq, bq, H), lambda b, n, i: (b, n, i, 0)),
        kv=pl.BlockSpec((sq, sq, S, H), lambda b, n, i: (b, n // G, 0, 0)),
        rows=pl.BlockSpec((sq, sq, 1, bq), lambda b, n, i: (b, n, 0, i)),
    )


def _params(backend: str):
    """Triton pinned (3 stages, 4 warps) or Mosaic TPU with every grid axis parallel."""
    if backend == "triton":
        return compiler_params("triton", num_warps=4, num_stages=3)
    return compiler_params("tpu", dimension_semantics=("parallel", "parallel", "parallel"))


def _forward(q, k, v, qpos, kpos, qseg, kseg, m: Mask, bq: int, bk: int, backend: str, interpret):
    B, N, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    sp = _specs(B, N, K, T, S, H, bq, bk)
    kernel = functools.partial(_fwd_kernel, m=m, bq=bq, bk=bk, self_attention=T == S)
    return pl.pallas_call(
        kernel, grid=(B, N, T // bq),
        in_specs=[sp["qpos"], sp["qpos"], sp["kpos"], sp["kpos"], sp["q"], sp["kv"], sp["kv"]],
        out_specs=[sp["q"], sp["rows"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, 1, T), jnp.float32)],
        interpret=interpret, compiler_params=_params(backend), name="flash_attention_fwd",
    )(qpos, qseg, kpos, kseg, q, k, v)


def _backward(q, k, v, qpos, kpos, qseg, kseg, o, lse, do, m: Mask, bq: int, bk: int, backend: str, interpret):
    B, N, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None]  # [B, N, 1, T]
    sp = _specs(B, N, K, T, S, H, bq, bk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, m=m, bq=bq, bk=bk, self_attention=T == S), grid=(B, N, T // bq),
        in_specs=[sp["qpos"], sp["qpos"], sp["kpos"], sp["kpos"], sp["q"], sp["kv"], sp["kv"], sp["q"], sp["rows"],
                  sp["rows"]],
        out_specs=sp["q"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
        compiler_params=_params(backend), name="flash_attention_dq",
    )(qpos, qseg, kpos, kseg, q, k, v, do, lse, delta)
    sq = pl.Squeezed()
    group_q = pl.BlockSpec((sq, G, T, H), lambda b, h, j: (b, h, 0, 0))
    group_rows = pl.BlockSpec((sq, G, 1, T), lambda b, h, j: (b, h, 0, 0))
    kv_block = pl.BlockSpec((sq, sq, bk, H), lambda b, h, j: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, m=m, bq=bq, bk=bk, self_attention=T == S), grid=(B, K, S // bk),
        in_specs=[pl.BlockSpec((sq, 1, T), lambda b, h, j: (b, 0, 0)), pl.BlockSpec((sq, 1, T), lambda b, h, j: (b, 0, 0)),
                  pl.BlockSpec((sq, 1, bk), lambda b, h, j: (b, 0, j)), pl.BlockSpec((sq, 1, bk), lambda b, h, j: (b, 0, j)),
                  group_q, kv_block, kv_block, group_q, group_rows, group_rows],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, compiler_params=_params(backend), name="flash_attention_dkv",
    )(qpos, qseg, kpos, kseg, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, qpos, kpos, qseg, kseg, m: Mask, bq: int, bk: int, backend: str, interpret):
    return _forward(q, k, v, qpos, kpos, qseg, kseg, m, bq, bk, backend, interpret)[0]


def _flash_fwd(q, k, v, qpos, kpos, qseg, kseg, m, bq, bk, backend, interpret):
    o, lse = _forward(q, k, v, qpos, kpos, qseg, kseg, m, bq, bk, backend, interpret)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _flash_bwd(m, bq, bk, backend, interpret, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    dq, dk, dv = _backward(q, k, v, qpos, kpos, qseg, kseg, o, lse, do, m, bq, bk, backend, interpret)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_block_sizes(T: int, S: int, H: int, backend: str) -> tuple[int, int]:
    """Per-backend defaults, never larger than the (rounded) sequence. TPU 128 x 128 (a lane-wide block of
    positions); Triton sized to fit shared memory, as measured on an H100
    (experiments/results/bench_kernels_h100.md): 64 x 64 for head_dim <= 64, 32 x 32 for 128, 16 x 16 above."""
    if backend == "tpu":
        return 128, 128
    bq = bk = 64 if H <= 64 else 32 if H <= 128 else 16
    return row_tile(T, bq, backend), row_tile(S, bk, backend)


def flash_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, causal: bool = True, sliding_window: int | None = None,
    logit_softcap: float | None = None, scale: float | None = None, block_q: int | None = None,
    block_k: int | None = None, backend: str | None = None, interpret=None,
) -> jax.Array:
    """Attention [B, T, N, H] of queries over keys/values [B, S, K, H] (N a multiple of K), positions and
    segment ids [B, T] / [B, S] int32. Differentiable in q, k, v. `backend`: triton | tpu (default: the
    current platform's; interpreted on CPU)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"query heads {N} must be a multiple of kv heads {K}")
    backend, interpret = resolve(backend, interpret)
    dq, dk = default_block_sizes(T, S, H, backend)
    bq, bk = block_q or dq, block_k or dk
    check_tile("block_q", bq, backend)
    check_tile("block_k", bk, backend)
    m = Mask(causal, sliding_window, logit_softcap, 1.0 / math.sqrt(H) if scale is None else scale)
    if T == S:  # stays square (a multiple of both blocks) so causal block skipping stays valid
        Tp = Sp = -(-T // math.lcm(bq, bk)) * math.lcm(bq, bk)
    else:
        Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    pad = lambda x, n, axis, value=0: jnp.pad(x, [(0, n - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)],
                                              constant_values=value)
    q = pad(q_BTNH, Tp, 1).transpose(0, 2, 1, 3)
    k = pad(k_BSKH, Sp, 1).transpose(0, 2, 1, 3)
    v = pad(v_BSKH, Sp, 1).transpose(0, 2, 1, 3)
    qpos, kpos = pad(q_positions.astype(jnp.int32), Tp, 1), pad(kv_positions.astype(jnp.int32), Sp, 1)
    qseg = pad(q_segment_ids.astype(jnp.int32), Tp, 1, _Q_PAD)
    kseg = pad(kv_segment_ids.astype(jnp.int32), Sp, 1, _KV_PAD)
    qpos, kpos, qseg, kseg = (a[:, None, :] for a in (qpos, kpos, qseg, kseg))  # [B, 1, T]
    out = _flash(q, k, v, qpos, kpos, qseg, kseg, m, bq, bk, backend, interpret)
    return out.transpose(0, 2, 1, 3)[:, :T]


def flash_attention_sharded(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, batch_axes: tuple[str, ...],
    head_axes: tuple[str, ...], **kwargs,
) -> jax.Array:
    """`flash_attention` under the current mesh (`jax.set_mesh`): a `shard_map` over the batch and head
    mesh axes (a Pallas call cannot be partitioned automatically), each device running the kernel on its
    shard. Axes that do not divide the batch or the kv heads are left out (replicated). Without a mesh,
    `flash_attention` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, **kwargs)

    def fitting(axes: tuple[str, ...], size: int) -> tuple[str, ...]:
        kept: list[str] = []
        for a in axes:
            n = mesh.shape[a]
            if n > 1 and size % (math.prod(mesh.shape[b] for b in kept) * n) == 0:
                kept.append(a)
        return tuple(kept)

    b_axes = fitting(batch_axes, q_BTNH.shape[0])
    h_axes = fitting(tuple(a for a in head_axes if a not in b_axes), k_BSKH.shape[2])
    if not b_axes and not h_axes:
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, **kwargs)
    P = jax.sharding.PartitionSpec
    heads, rows = P(b_axes or None, None, h_axes or None, None), P(b_axes or None, None)
    names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")
    ints = [kwargs.pop(n) for n in names]

    def local(q, k, v, *ids):
        return flash_attention(q, k, v, **dict(zip(names, ids)), **kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows, rows, rows, rows), out_specs=heads,
                         check_vma=False)(q_BTNH, k_BSKH, v_BSKH, *ints)
