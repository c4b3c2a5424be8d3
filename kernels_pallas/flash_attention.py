"""Flash attention, forward and backward, as Pallas kernels (online softmax in base 2, log-sum-exp saved).

    out_BTNH = flash_attention(q_BTNH, k_BSKH, v_BSKH, q_positions=..., kv_positions=...,
                               q_segment_ids=..., kv_segment_ids=..., causal=True)

Masking is jaxllm's: query t sees key s iff they share a segment id, and pos_s <= pos_t (causal) and
|pos_t - pos_s| < window; scores are optionally soft-capped. GQA/MQA read the shared kv head through the
index map, never repeating it. Sequence lengths are padded to the tiles inside (padded keys carry a segment
id no query has).

Before the kernels run, `block_classes` sorts every (query block, key block) pair of each row into skip /
full / partial from the blocks' min and max positions and segment ids: skipped pairs cost a branch, full
ones run without a mask, only partial ones build it (packed rows of many documents skip most pairs). With
`causal` and T == S the loops also stop at the diagonal (and start at the window), which assumes positions
advance one per index within a segment, as in packed rows. Scores are scaled by log2(e) so the softmax
uses exp2. The backward on Triton is one kernel per key block looping over (query head of the kv head's
group, query block): dk, dv and dq (added to an f32 accumulator with atomics) at 5 matmuls per pair; TPU
has no atomics, so there dq is its own kernel over key blocks per query block (3 + 4 matmuls). Each
kernel has its own tiles (`Tiles`). On Triton the kernels read and write the model's [B, T, heads, H]
layout in place (no transposes); TPU blocks need [B, heads, T, H]. `interpret=True` runs them on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.backend import check_tile, compiler_params, resolve, row_tile

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows stay NaN-free
_Q_PAD, _KV_PAD = -1, -2  # segment ids of padding: they never match each other or a real id
LOG2E = math.log2(math.e)
SKIP, FULL, PARTIAL = 0, 1, 2


class Mask(NamedTuple):
    causal: bool
    window: int | None
    softcap: float | None
    scale: float


class Tiles(NamedTuple):
    """(query rows, key rows) per block for the forward, dq and dk/dv kernels."""

    fwd: tuple[int, int]
    dq: tuple[int, int]
    dkv: tuple[int, int]


def attention_reference(
    q_BTNH, k_BSKH, v_BSKH, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
    causal: bool = True, sliding_window: int | None = None, logit_softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The pure-JAX reference: materialised [B, N, T, S] scores and mask, softmax in f32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    k_BSNH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSNH = jnp.repeat(v_BSKH, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    distance_BTS = q_positions[:, :, None] - kv_positions[:, None, :]
    visible_BTS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        visible_BTS &= distance_BTS >= 0
    if sliding_window is not None:
        visible_BTS &= jnp.abs(distance_BTS) < sliding_window
    p = jax.nn.softmax(jnp.where(visible_BTS[:, None], s, MASKED), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p.astype(v_BSKH.dtype), v_BSNH)


def _mask(q_pos, k_pos, q_seg, k_seg, m: Mask) -> jax.Array:
    mask = q_seg == k_seg
    if m.causal:
        mask &= q_pos >= k_pos
    if m.window is not None:
        mask &= jnp.abs(q_pos - k_pos) < m.window
    return mask


def block_classes(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, bq: int, bk: int, m: Mask) -> jax.Array:
    """int32 [B, T / bq, S / bk]: SKIP where no query of the block sees a key of the other, FULL where every
    one sees every one, else PARTIAL; from per-block min / max of positions and segment ids (exact for
    packed rows' pairs on or below the causal diagonal; elsewhere a pair may be called PARTIAL when SKIP or
    FULL would hold, never the reverse)."""
    def extent(x_BT, b):
        x = x_BT.reshape(x_BT.shape[0], -1, b)
        return x.min(-1), x.max(-1)

    (qp0, qp1), (kp0, kp1) = extent(q_pos_BT, bq), extent(k_pos_BS, bk)
    (qs0, qs1), (ks0, ks1) = extent(q_seg_BT, bq), extent(k_seg_BS, bk)
    q = lambda x: x[:, :, None]
    k = lambda x: x[:, None, :]
    skip = (q(qs1) < k(ks0)) | (q(qs0) > k(ks1))
    full = (q(qs0) == q(qs1)) & (k(ks0) == k(ks1)) & (q(qs0) == k(ks0))
    if m.causal:
        skip |= q(qp1) < k(kp0)
        full &= q(qp0) >= k(kp1)
    if m.window is not None:
        skip |= (q(qp0) - k(kp1) >= m.window) | (k(kp0) - q(qp1) >= m.window)
        full &= (q(qp1) - k(kp0) < m.window) & (k(kp1) - q(qp0) < m.window)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def _by_class(cls, carry, visit):
    """carry unchanged for SKIP, visit(carry, masked=False) for FULL, visit(carry, masked=True) for PARTIAL."""
    return lax.cond(cls == SKIP, lambda c: c,
                    lambda c: lax.cond(cls == FULL, lambda c: visit(c, False), lambda c: visit(c, True), c), carry)


def _scores(q, k, m: Mask):
    """Raw scores [bq, bk] in f32 and the soft-capped scores in base 2 (times log2 e)."""
    raw = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * m.scale
    capped = m.softcap * jnp.tanh(raw / m.softcap) if m.softcap is not None else raw
    return raw, capped * LOG2E


def _dscores(p, dp, delta, raw, m: Mask):
    """d loss / d raw scores from the softmax backward (and the soft-cap's tanh derivative)."""
    ds = p * (dp - delta[:, None])
    if m.softcap is not None:
        ds = ds * (1.0 - jnp.square(jnp.tanh(raw / m.softcap)))
    return ds


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


def _class_of(cls_ref, b, row, j, backend: str):
    """The class of pair (row, j) of batch row b: Triton reads the whole table in global memory, TPU the
    [1, columns] row delivered to SMEM for this program."""
    return cls_ref[b, row, j] if backend == "triton" else cls_ref[0, j]


def _fwd_kernel(cls_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, m: Mask,
                bq: int, bk: int, self_attention: bool, backend: str):
    b, qi = pl.program_id(0), pl.program_id(2)
    q, qpos, qseg = q_ref[...], qpos_ref[0, :], qseg_ref[0, :]

    def body(j, carry):
        def visit(carry, masked: bool):
            acc, m_i, l_i = carry
            ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
            _, s = _scores(q, k_ref[ks, :], m)
            if masked:
                s = jnp.where(_mask(qpos[:, None], kpos_ref[0, ks][None, :], qseg[:, None], kseg_ref[0, ks][None, :], m),
                              s, MASKED)
            m_new = jnp.maximum(m_i, s.max(axis=-1))
            p = jnp.exp2(s - m_new[:, None])
            corr = jnp.exp2(m_i - m_new)
            v = v_ref[ks, :]
            acc = corr[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc, m_new, corr * l_i + p.sum(axis=-1)

        return _by_class(_class_of(cls_ref, b, qi, j, backend), carry, visit)

    lo, hi = _kv_range(qi, bq, bk, k_ref.shape[0] // bk, m, self_attention)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(lo, hi, body, init)
    l_safe = jnp.where(l_i == 0, 1.0, l_i)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[0, :] = m_i + jnp.log2(l_safe)  # base 2


def _dq_kernel(cls_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, m: Mask, bq: int, bk: int, self_attention: bool, backend: str):
    b, qi = pl.program_id(0), pl.program_id(2)
    q, do, qpos, qseg = q_ref[...], do_ref[...], qpos_ref[0, :], qseg_ref[0, :]
    lse, delta = lse_ref[0, :], delta_ref[0, :]

    def body(j, dq):
        def visit(dq, masked: bool):
            ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
            k, v = k_ref[ks, :], v_ref[ks, :]
            raw, s = _scores(q, k, m)
            p = jnp.exp2(s - lse[:, None])
            if masked:
                p = jnp.where(_mask(qpos[:, None], kpos_ref[0, ks][None, :], qseg[:, None], kseg_ref[0, ks][None, :], m),
                              p, 0.0)
            dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return dq + jnp.dot(_dscores(p, dp, delta, raw, m).astype(k.dtype), k, preferred_element_type=jnp.float32)

        return _by_class(_class_of(cls_ref, b, qi, j, backend), dq, visit)

    lo, hi = _kv_range(qi, bq, bk, k_ref.shape[0] // bk, m, self_attention)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * m.scale).astype(dq_ref.dtype)


def _dkv_kernel(cls_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                m: Mask, bq: int, bk: int, self_attention: bool, backend: str):
    """One loop over (query head g of this kv head's group, query block i): GQA folded into the loop. On
    Triton it also adds each pair's dS K into the f32 dq accumulator (atomically, across key-block
    programs): 5 matmuls per pair for the whole backward, and no separate dq kernel."""
    if backend == "triton":
        _, dk_ref, dv_ref, dq_ref = refs  # refs[0]: the zero dq input, aliased to dq_ref
    else:
        dk_ref, dv_ref = refs
    b, h, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v, kpos, kseg = k_ref[...], v_ref[...], kpos_ref[0, :], kseg_ref[0, :]
    seq_major = _seq_major(backend)
    (T, G) = q_ref.shape[:2] if seq_major else q_ref.shape[1::-1]  # q_ref: [T, G, H] or [G, T, H]
    lo, hi = _q_range(kj, bq, bk, T // bq, m, self_attention)
    span = hi - lo

    def body(t, carry):
        g, i = lax.div(t, span), lo + lax.rem(t, span)

        def visit(carry, masked: bool):
            dk, dv = carry
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            at = (qs, g, slice(None)) if seq_major else (g, qs, slice(None))
            q, do = q_ref[at], do_ref[at]
            raw, s = _scores(q, k, m)
            p = jnp.exp2(s - lse_ref[g, 0, qs][:, None])
            if masked:
                p = jnp.where(_mask(qpos_ref[0, qs][:, None], kpos[None, :], qseg_ref[0, qs][:, None], kseg[None, :], m),
                              p, 0.0)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = _dscores(p, dp, delta_ref[g, 0, qs], raw, m)
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            if backend == "triton":
                dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * m.scale
                pltriton.atomic_add(dq_ref, (b, qs, h * G + g, pl.ds(0, dq.shape[1])), dq)  # Triton: seq-major
            return dk, dv

        return _by_class(_class_of(cls_ref, b, kj, i, backend), carry, visit)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G * span, body, (zeros, zeros))
    dk_ref[...] = (dk * m.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _class_spec(backend: str, table):
    """The class table [B, rows, columns] for a grid (batch, head, row): whole in global memory (Triton) or
    one [1, columns] row per program in SMEM (TPU; the table is passed as [B, rows, 1, columns])."""
    if backend == "triton":
        return pl.BlockSpec(memory_space=pl.ANY), table
    B, rows, cols = table.shape
    spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), 1, cols), lambda b, n, i: (b, i, 0, 0), memory_space=pltpu.SMEM)
    return spec, table.reshape(B, rows, 1, cols)


def _params(backend: str, H: int):
    """Triton pinned (2 pipeline stages, 4 warps up to head_dim 64, 8 above) or Mosaic TPU with every grid
    axis parallel."""
    if backend == "triton":
        return compiler_params("triton", num_warps=4 if H <= 64 else 8, num_stages=2)
    return compiler_params("tpu", dimension_semantics=("parallel", "parallel", "parallel"))


def _seq_major(backend: str) -> bool:
    """Triton reads the model's [B, T, heads, H] layout in place (strided blocks); Mosaic TPU needs a block's
    last two dims whole or tiled, so TPU kernels get [B, heads, T, H] (transposed outside)."""
    return backend == "triton"


def _dims(q, k, backend: str) -> tuple[int, int, int, int, int, int]:
    """(B, N, T, H, K, S) of q and k in the backend's layout."""
    if _seq_major(backend):
        (B, T, N, H), (S, K) = q.shape, k.shape[1:3]
    else:
        (B, N, T, H), (K, S) = q.shape, k.shape[1:3]
    return B, N, T, H, K, S


def _head_block(backend: str, rows: int, H: int, index):
    """BlockSpec of `rows` sequence rows of one head; index(grid ids) -> (batch, head, row block)."""
    sq = pl.Squeezed()
    if _seq_major(backend):
        return pl.BlockSpec((sq, rows, sq, H), lambda *ids: (lambda b, n, r: (b, r, n, 0))(*index(*ids)))
    return pl.BlockSpec((sq, sq, rows, H), lambda *ids: (lambda b, n, r: (b, n, r, 0))(*index(*ids)))


def _query_block_specs(backend: str, bq: int, S: int, H: int, G: int):
    """Specs over grid (batch, head, query block), shared by the forward and dq kernels: this block's
    positions / segment ids [1, bq], all keys' [1, S], the q block, the whole K or V of the head's kv head,
    and this block's row statistics [1, bq]."""
    sq = pl.Squeezed()
    return (pl.BlockSpec((sq, 1, bq), lambda b, n, i: (b, 0, i)), pl.BlockSpec((sq, 1, S), lambda b, n, i: (b, 0, 0)),
            _head_block(backend, bq, H, lambda b, n, i: (b, n, i)),
            _head_block(backend, S, H, lambda b, n, i: (b, n // G, 0)),
            pl.BlockSpec((sq, sq, 1, bq), lambda b, n, i: (b, n, 0, i)))


def _forward(q, k, v, qpos, kpos, qseg, kseg, m: Mask, tiles: Tiles, backend: str, interpret):
    B, N, T, H, K, S = _dims(q, k, backend)
    G, (bq, bk) = N // K, tiles.fwd
    cls_spec, cls = _class_spec(backend, block_classes(qpos[:, 0], kpos[:, 0], qseg[:, 0], kseg[:, 0], bq, bk, m))
    qrow, krow, q_block, kv_whole, stats = _query_block_specs(backend, bq, S, H, G)
    kernel = functools.partial(_fwd_kernel, m=m, bq=bq, bk=bk, self_attention=T == S, backend=backend)
    return pl.pallas_call(
        kernel, grid=(B, N, T // bq),
        in_specs=[cls_spec, qrow, qrow, krow, krow, q_block, kv_whole, kv_whole],
        out_specs=[q_block, stats],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, 1, T), jnp.float32)],
        interpret=interpret, compiler_params=_params(backend, H), name="flash_attention_fwd",
    )(cls, qpos, qseg, kpos, kseg, q, k, v)


def _backward(q, k, v, qpos, kpos, qseg, kseg, o, lse, do, m: Mask, tiles: Tiles, backend: str, interpret):
    B, N, T, H, K, S = _dims(q, k, backend)
    G = N // K
    sq = pl.Squeezed()
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, T, N] or [B, N, T]
    delta = (delta.transpose(0, 2, 1) if _seq_major(backend) else delta)[:, :, None]  # [B, N, 1, T]
    ids = (qpos[:, 0], kpos[:, 0], qseg[:, 0], kseg[:, 0])

    bq, bk = tiles.dkv
    cls_spec, cls = _class_spec(backend, block_classes(*ids, bq, bk, m).transpose(0, 2, 1))  # [B, key blocks, q blocks]
    qrow = pl.BlockSpec((sq, 1, T), lambda b, h, j: (b, 0, 0))
    krow = pl.BlockSpec((sq, 1, bk), lambda b, h, j: (b, 0, j))
    group_q = (pl.BlockSpec((sq, T, G, H), lambda b, h, j: (b, 0, h, 0)) if _seq_major(backend)
               else pl.BlockSpec((sq, G, T, H), lambda b, h, j: (b, h, 0, 0)))
    group_stats = pl.BlockSpec((sq, G, 1, T), lambda b, h, j: (b, h, 0, 0))
    kv_block = _head_block(backend, bk, H, lambda b, h, j: (b, h, j))
    in_specs = [cls_spec, qrow, qrow, krow, krow, group_q, kv_block, kv_block, group_q, group_stats, group_stats]
    out_specs = [kv_block, kv_block]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    args = [cls, qpos, qseg, kpos, kseg, q, k, v, do, lse, delta]
    aliases = {}
    if backend == "triton":  # dq accumulates in f32 inside this kernel
        anywhere = pl.BlockSpec(memory_space=pl.ANY)
        in_specs, out_specs = in_specs + [anywhere], out_specs + [anywhere]
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
        args.append(jnp.zeros(q.shape, jnp.float32))
        aliases = {len(args) - 1: 2}
    grads = pl.pallas_call(
        functools.partial(_dkv_kernel, m=m, bq=bq, bk=bk, self_attention=T == S, backend=backend), grid=(B, K, S // bk),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        interpret=interpret, compiler_params=_params(backend, H), name="flash_attention_dkv",
    )(*args)
    if backend == "triton":
        dk, dv, dq = grads
        return dq.astype(q.dtype), dk, dv
    dk, dv = grads

    bq, bk = tiles.dq  # TPU: no atomics, so dq is a kernel of its own
    cls_spec, cls = _class_spec(backend, block_classes(*ids, bq, bk, m))
    qrow, krow, q_block, kv_whole, stats = _query_block_specs(backend, bq, S, H, G)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, m=m, bq=bq, bk=bk, self_attention=T == S, backend=backend), grid=(B, N, T // bq),
        in_specs=[cls_spec, qrow, qrow, krow, krow, q_block, kv_whole, kv_whole, q_block, stats, stats],
        out_specs=q_block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
        compiler_params=_params(backend, H), name="flash_attention_dq",
    )(cls, qpos, qseg, kpos, kseg, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, qpos, kpos, qseg, kseg, m: Mask, tiles: Tiles, backend: str, interpret):
    return _forward(q, k, v, qpos, kpos, qseg, kseg, m, tiles, backend, interpret)[0]


def _flash_fwd(q, k, v, qpos, kpos, qseg, kseg, m, tiles, backend, interpret):
    o, lse = _forward(q, k, v, qpos, kpos, qseg, kseg, m, tiles, backend, interpret)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _flash_bwd(m, tiles, backend, interpret, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    dq, dk, dv = _backward(q, k, v, qpos, kpos, qseg, kseg, o, lse, do, m, tiles, backend, interpret)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_tiles(T: int, S: int, H: int, backend: str) -> Tiles:
    """Per-backend defaults, never larger than the (rounded) sequence. TPU 128 x 128 everywhere (a lane-wide
    block of positions). Triton: the backward tiles measured to fit an H100's shared memory when one pair
    served all three kernels (64 x 64 up to head_dim 64, 32 x 32 at 128, 16 x 16 above); the forward, which
    holds one q block and streams k/v, takes 128 query rows (jax's own Triton attention's default) over key
    blocks of 64 (32 above head_dim 128). Untuned on hardware since the split: sweep with bench_gpu.py."""
    if backend == "tpu":
        return Tiles((128, 128), (128, 128), (128, 128))
    b = 64 if H <= 64 else 32 if H <= 128 else 16
    fit = lambda bq, bk: (row_tile(T, bq, backend), row_tile(S, bk, backend))
    return Tiles(fit(128, 64 if H <= 128 else 32), fit(b, b), fit(b, b))


def flash_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, causal: bool = True, sliding_window: int | None = None,
    logit_softcap: float | None = None, scale: float | None = None, block_q: int | None = None,
    block_k: int | None = None, tiles: Tiles | None = None, backend: str | None = None, interpret=None,
) -> jax.Array:
    """Attention [B, T, N, H] of queries over keys/values [B, S, K, H] (N a multiple of K), positions and
    segment ids [B, T] / [B, S] int32. Differentiable in q, k, v. `block_q` / `block_k` set every kernel's
    tiles, `tiles` each kernel's (default `default_tiles`). `backend`: triton | tpu (default: the current
    platform's; interpreted on CPU)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"query heads {N} must be a multiple of kv heads {K}")
    backend, interpret = resolve(backend, interpret)
    if tiles is None:
        tiles = default_tiles(T, S, H, backend)
        if block_q or block_k:
            tiles = Tiles(*[(block_q or bq, block_k or bk) for bq, bk in tiles])
    for name, (bq, bk) in zip(Tiles._fields, tiles):
        check_tile(f"{name} block_q", bq, backend)
        check_tile(f"{name} block_k", bk, backend)
    m = Mask(causal, sliding_window, logit_softcap, 1.0 / math.sqrt(H) if scale is None else scale)
    q_tile, k_tile = math.lcm(*(bq for bq, _ in tiles)), math.lcm(*(bk for _, bk in tiles))
    if T == S:  # stays square (a multiple of every tile) so causal block skipping stays valid
        Tp = Sp = -(-T // math.lcm(q_tile, k_tile)) * math.lcm(q_tile, k_tile)
    else:
        Tp, Sp = -(-T // q_tile) * q_tile, -(-S // k_tile) * k_tile
    pad = lambda x, n, axis, value=0: jnp.pad(x, [(0, n - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)],
                                              constant_values=value)
    heads_major = (lambda x: x) if _seq_major(backend) else (lambda x: x.transpose(0, 2, 1, 3))
    q, k, v = heads_major(pad(q_BTNH, Tp, 1)), heads_major(pad(k_BSKH, Sp, 1)), heads_major(pad(v_BSKH, Sp, 1))
    qpos, kpos = pad(q_positions.astype(jnp.int32), Tp, 1), pad(kv_positions.astype(jnp.int32), Sp, 1)
    qseg = pad(q_segment_ids.astype(jnp.int32), Tp, 1, _Q_PAD)
    kseg = pad(kv_segment_ids.astype(jnp.int32), Sp, 1, _KV_PAD)
    qpos, kpos, qseg, kseg = (a[:, None, :] for a in (qpos, kpos, qseg, kseg))  # [B, 1, T]
    out = _flash(q, k, v, qpos, kpos, qseg, kseg, m, tiles, backend, interpret)
    return heads_major(out)[:, :T]


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
