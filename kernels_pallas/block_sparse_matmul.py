"""Block-sparse matmul y = x @ W, W [K, N] stored as dense blocks [nnz, bk, bn] with a static layout.

    layout = BlockLayout.block_diagonal(4, block_k=512, block_n=1408)   # or .from_mask(mask, bk, bn)
    y_MN = block_sparse_matmul(x_MK, blocks, layout)                    # differentiable in x and blocks
    plan(M, 512, 1408, jnp.bfloat16, "triton")                          # tiles and on-chip bytes

Tiles (tm, tk, tn) are independent of the block size: blocks are zero-padded at call time to multiples of
(tk, tn) (so any block size works, 235 as well as 4096), and precomputed tables list, per output tile
column, the (stored block, K tile) pairs that feed it. Forward and dX (= dY W^T) are one "gathered
matmul": out[m, j] = sum over the table entries of column j of a[m, tile] @ w[block, tile] (transposed for
dX). dW runs a program per (stored block, K tile, N tile) reducing over row tiles. Only stored blocks are
touched. Two styles share the tables (`kernels_pallas/backend.py`): Triton programs loop over their
entries loading tiles from global memory; TPU programs see one entry per step of the innermost grid axis
(tables as scalar prefetch, f32 accumulator in VMEM). `block_sparse_reference` materialises W.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.backend import (
    GPU_SMEM_BUDGET, TPU_VMEM_BUDGET, check_tile, compiler_params, pow2_at_least, resolve, round_up, row_tile,
)


@dataclass(frozen=True)
class BlockLayout:
    """Stored (row block, column block) pairs of a [rows * block_k, cols * block_n] matrix, in storage order."""

    rows: int
    cols: int
    pairs: tuple[tuple[int, int], ...]
    block_k: int
    block_n: int

    def __post_init__(self):
        if len(set(self.pairs)) != len(self.pairs) or not self.pairs:
            raise ValueError("a block layout needs at least one block and no duplicates")
        if any(not (0 <= r < self.rows and 0 <= c < self.cols) for r, c in self.pairs):
            raise ValueError(f"block pairs must lie within {self.rows} x {self.cols} blocks")

    @classmethod
    def from_mask(cls, mask: np.ndarray, block_k: int, block_n: int) -> BlockLayout:
        """Blocks where the boolean [rows, cols] mask is True, row-major."""
        mask = np.asarray(mask, bool)
        pairs = tuple((int(r), int(c)) for r, c in zip(*np.nonzero(mask)))
        return cls(mask.shape[0], mask.shape[1], pairs, block_k, block_n)

    @classmethod
    def block_diagonal(cls, n: int, block_k: int, block_n: int, permutation: tuple[int, ...] | None = None) -> BlockLayout:
        """n diagonal blocks; with `permutation`, block i sits in column permutation[i] (a block shuffle)."""
        perm = tuple(range(n)) if permutation is None else tuple(permutation)
        if sorted(perm) != list(range(n)):
            raise ValueError(f"permutation {perm} is not a permutation of range({n})")
        return cls(n, n, tuple((i, perm[i]) for i in range(n)), block_k, block_n)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows * self.block_k, self.cols * self.block_n

    @property
    def density(self) -> float:
        return len(self.pairs) / (self.rows * self.cols)

    def dense(self, blocks: jax.Array) -> jax.Array:
        """The full matrix [K, N] with zeros outside the stored blocks."""
        grid = jnp.zeros((self.rows, self.cols, self.block_k, self.block_n), blocks.dtype)
        r, c = np.asarray(self.pairs).T
        grid = grid.at[r, c].set(blocks)
        return grid.transpose(0, 2, 1, 3).reshape(self.shape)


def block_sparse_reference(x_MK: jax.Array, blocks: jax.Array, layout: BlockLayout) -> jax.Array:
    """x @ W with W materialised from its blocks (the pure-JAX reference)."""
    return jnp.dot(x_MK, layout.dense(blocks).astype(x_MK.dtype), preferred_element_type=jnp.float32).astype(x_MK.dtype)


@dataclass(frozen=True)
class Plan:
    """Tiles of one block-sparse matmul and the on-chip bytes each program holds (per kernel)."""

    backend: str
    tm: int  # rows per tile (forward, dX)
    tk: int  # K tile (divides block_k)
    tn: int  # N tile (divides block_n)
    dw_tm: int  # rows per step of the dW reduction
    block_k: int  # block sizes padded to whole tiles
    block_n: int
    num_warps: int | None
    num_stages: int | None
    bytes_fwd: int
    bytes_dx: int
    bytes_dw: int

    @property
    def budget(self) -> int:
        return GPU_SMEM_BUDGET if self.backend == "triton" else TPU_VMEM_BUDGET

    @property
    def bytes(self) -> int:
        return max(self.bytes_fwd, self.bytes_dx, self.bytes_dw)

    @property
    def fits(self) -> bool:
        return self.bytes <= self.budget


def _largest_dividing(n: int, choices: tuple[int, ...]) -> int:
    return next(c for c in choices if n % c == 0)


def plan(M: int, block_k: int, block_n: int, dtype, backend: str,
         tiles: tuple[int, int, int] | None = None) -> Plan:
    """Tiles for x [M, ...] times blocks of block_k x block_n in `dtype` on `backend` (triton | tpu), and the
    bytes each program keeps on chip. `tiles` = explicit (tm, tk, tn), checked against the backend's rules.

    Triton: power-of-two tiles (tm <= 128, halved until the budget holds; tk x tn 64 x 128 for 2-byte types,
    32 x 64 for 4-byte), blocks padded to whole tiles, 3 pipeline stages; bytes = stages x the tiles loaded
    per loop step. TPU: K and N tiles of
    128-512 lanes dividing the block rounded up to 128, tm <= 256 rows; bytes = double-buffered in/out blocks
    + the f32 accumulator."""
    b = jnp.dtype(dtype).itemsize
    if backend == "triton":
        tm, tk, tn = tiles or (row_tile(M, 128, backend), min(64 if b <= 2 else 32, pow2_at_least(block_k)),
                               min(128 if b <= 2 else 64, pow2_at_least(block_n)))
        stages = 3
        bk, bn = round_up(block_k, tk), round_up(block_n, tn)
        step = lambda *sizes: stages * sum(sizes) * b
        while tiles is None and tm > 16 and max(step(tm * tk, tk * tn), step(tm * tn, tk * tn)) > GPU_SMEM_BUDGET:
            tm //= 2
        dw_tm = next((t for t in (128, 64, 32, 16) if t <= tm and step(t * tk, t * tn) <= GPU_SMEM_BUDGET), 16)
        fwd, dx, dw = step(tm * tk, tk * tn), step(tm * tn, tk * tn), step(dw_tm * tk, dw_tm * tn)
        warps = 8 if tm * max(tk, tn) >= 128 * 128 else 4
    elif backend == "tpu":
        bk, bn = round_up(block_k, 128), round_up(block_n, 128)
        tm, tk, tn = tiles or (row_tile(M, 256, backend), _largest_dividing(bk, (512, 256, 128)),
                               _largest_dividing(bn, (512, 256, 128)))
        bk, bn = round_up(block_k, tk), round_up(block_n, tn)
        dw_tm, stages, warps = tm, None, None
        blocks = lambda ins, out: 2 * sum(ins) * b + 2 * out * b + out * 4  # double-buffered, f32 accumulator
        fwd, dx, dw = blocks((tm * tk, tk * tn), tm * tn), blocks((tm * tn, tk * tn), tm * tk), \
            blocks((tm * tk, tm * tn), tk * tn)
    else:
        raise ValueError(f"block-sparse plan for backend {backend!r}; choose triton or tpu")
    for name, size in (("tm", tm), ("tk", tk), ("tn", tn)):
        check_tile(name, size, backend)
    if backend == "tpu" and (tk % 128 or tn % 128):
        raise ValueError(f"TPU K and N tiles must be multiples of 128 lanes, got tk={tk} tn={tn}")
    return Plan(backend, tm, tk, tn, dw_tm, bk, bn, warps, stages, fwd, dx, dw)


@functools.lru_cache(maxsize=256)
def _tables(layout: BlockLayout, tk: int, tn: int, bk: int, bn: int, by: str) -> tuple[np.ndarray, ...]:
    """Per output tile column, the entries (a tile, stored block, w tile row, w tile col) that feed it, as
    int32 [columns, steps] arrays padded by repeating the last entry (so a TPU pipeline fetches nothing
    new), and the entry count per column [columns]. by='col': the forward (output tiles of N, a = x tiles
    of K); by='row': dX (output tiles of K, a = dY tiles of N)."""
    nk, nn = bk // tk, bn // tn
    if by == "col":
        columns = [[(r * nk + t, i, t, q) for i, (r, c) in enumerate(layout.pairs) if c == col for t in range(nk)]
                   for col in range(layout.cols) for q in range(nn)]
    else:
        columns = [[(c * nn + t, i, p, t) for i, (r, c) in enumerate(layout.pairs) if r == row for t in range(nn)]
                   for row in range(layout.rows) for p in range(nk)]
    steps = max(1, max(len(e) for e in columns))
    table = np.zeros((len(columns), steps, 4), np.int32)
    for j, entries in enumerate(columns):
        if entries:
            table[j] = entries + [entries[-1]] * (steps - len(entries))
    counts = np.asarray([len(e) for e in columns], np.int32)
    return (*(np.ascontiguousarray(table[..., f]) for f in range(4)), counts)


def _dot(a, w, transpose: bool):
    dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)


def _gather_loop_kernel(at_ref, blk_ref, wp_ref, wq_ref, count_ref, a_ref, w_ref, o_ref, *, tm, ta, tk, tn, transpose):
    """Triton: one program per (row tile, output tile column), looping over that column's entries."""
    m, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(m * tm, tm), tm)

    def body(s, acc):
        a = a_ref[rows, pl.ds(pl.multiple_of(at_ref[j, s] * ta, ta), ta)]
        w = w_ref[blk_ref[j, s], pl.ds(pl.multiple_of(wp_ref[j, s] * tk, tk), tk),
                  pl.ds(pl.multiple_of(wq_ref[j, s] * tn, tn), tn)]
        return acc + _dot(a, w, transpose)

    o_ref[...] = lax.fori_loop(0, count_ref[j], body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def _gather_grid_kernel(at_ref, blk_ref, wp_ref, wq_ref, count_ref, a_ref, w_ref, o_ref, acc_ref, *, transpose):
    """TPU: one grid step per entry (innermost axis), accumulating in VMEM."""
    j, s = pl.program_id(1), pl.program_id(2)

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(s < count_ref[j])
    def _():
        acc_ref[...] += _dot(a_ref[...], w_ref[...], transpose)

    @pl.when(s == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _gather_call(a, blocks, layout: BlockLayout, p: Plan, transpose: bool, interpret):
    """Forward (transpose=False: a = x, out [M, N]) or dX (transpose=True: a = dY, out [M, K]), padded sizes."""
    tm, tk, tn = p.tm, p.tk, p.tn
    at, blk, wp, wq, counts = _tables(layout, tk, tn, p.block_k, p.block_n, "row" if transpose else "col")
    ta, tout = (tn, tk) if transpose else (tk, tn)
    out_cols = (layout.rows * p.block_k) if transpose else (layout.cols * p.block_n)
    M = a.shape[0]
    out_shape = jax.ShapeDtypeStruct((M, out_cols), a.dtype)
    name = "block_sparse_matmul_dx" if transpose else "block_sparse_matmul"
    tables = [jnp.asarray(t) for t in (at, blk, wp, wq, counts)]
    if p.backend == "triton":
        anywhere = pl.BlockSpec(memory_space=pl.ANY)
        return pl.pallas_call(
            functools.partial(_gather_loop_kernel, tm=tm, ta=ta, tk=tk, tn=tn, transpose=transpose),
            grid=(M // tm, out_cols // tout), in_specs=[anywhere] * 7,
            out_specs=pl.BlockSpec((tm, tout), lambda m, j: (m, j)), out_shape=out_shape, interpret=interpret,
            compiler_params=compiler_params("triton", num_warps=p.num_warps, num_stages=p.num_stages), name=name,
        )(*tables, a, blocks)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(M // tm, out_cols // tout, at.shape[1]),
        in_specs=[pl.BlockSpec((tm, ta), lambda m, j, s, at, *_: (m, at[j, s])),
                  pl.BlockSpec((pl.Squeezed(), tk, tn), lambda m, j, s, at, blk, wp, wq, _: (blk[j, s], wp[j, s], wq[j, s]))],
        out_specs=pl.BlockSpec((tm, tout), lambda m, j, s, *_: (m, j)),
        scratch_shapes=[pltpu.VMEM((tm, tout), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_gather_grid_kernel, transpose=transpose), grid_spec=grid_spec, out_shape=out_shape,
        interpret=interpret, name=name,
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")),
    )(*tables, a, blocks)


def _dw_loop_kernel(xt_ref, yt_ref, x_ref, dy_ref, dw_ref, *, tm, tk, tn):
    """Triton: one program per (stored block, K tile, N tile), looping over row tiles."""
    i, p, q = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    xs = pl.ds(pl.multiple_of((xt_ref[i] + p) * tk, tk), tk)
    ys = pl.ds(pl.multiple_of((yt_ref[i] + q) * tn, tn), tn)

    def body(t, acc):
        rows = pl.ds(pl.multiple_of(t * tm, tm), tm)
        return acc + lax.dot_general(x_ref[rows, xs], dy_ref[rows, ys], (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, x_ref.shape[0] // tm, body, jnp.zeros((tk, tn), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _dw_grid_kernel(xt_ref, yt_ref, x_ref, dy_ref, dw_ref, acc_ref):
    """TPU: rows are the innermost grid axis, accumulated in VMEM."""
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += lax.dot_general(x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _dw_call(x, dy, layout: BlockLayout, p: Plan, dtype, interpret):
    """dW for every stored block: [nnz, block_k, block_n] (padded sizes)."""
    tk, tn = p.tk, p.tn
    nk, nn = p.block_k // tk, p.block_n // tn
    xt = jnp.asarray([r * nk for r, _ in layout.pairs], jnp.int32)  # first K tile of each block's rows
    yt = jnp.asarray([c * nn for _, c in layout.pairs], jnp.int32)  # first N tile of its columns
    nnz, M = len(layout.pairs), x.shape[0]
    out_shape = jax.ShapeDtypeStruct((nnz, p.block_k, p.block_n), dtype)
    if p.backend == "triton":
        anywhere = pl.BlockSpec(memory_space=pl.ANY)
        return pl.pallas_call(
            functools.partial(_dw_loop_kernel, tm=p.dw_tm, tk=tk, tn=tn), grid=(nnz, nk, nn), in_specs=[anywhere] * 4,
            out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda i, a, b: (i, a, b)), out_shape=out_shape,
            interpret=interpret, name="block_sparse_matmul_dw",
            compiler_params=compiler_params("triton", num_warps=p.num_warps, num_stages=p.num_stages),
        )(xt, yt, x, dy)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nnz, nk, nn, M // p.dw_tm),
        in_specs=[pl.BlockSpec((p.dw_tm, tk), lambda i, a, b, t, xt, yt: (t, xt[i] + a)),
                  pl.BlockSpec((p.dw_tm, tn), lambda i, a, b, t, xt, yt: (t, yt[i] + b))],
        out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda i, a, b, t, *_: (i, a, b)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    return pl.pallas_call(
        _dw_grid_kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret, name="block_sparse_matmul_dw",
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(xt, yt, x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bsmm(x, blocks, layout, p, interpret):
    return _gather_call(x, blocks, layout, p, False, interpret)


def _bsmm_fwd(x, blocks, layout, p, interpret):
    return _gather_call(x, blocks, layout, p, False, interpret), (x, blocks)


def _bsmm_bwd(layout, p, interpret, res, dy):
    x, blocks = res
    dy = dy.astype(x.dtype)
    return _gather_call(dy, blocks, layout, p, True, interpret), _dw_call(x, dy, layout, p, blocks.dtype, interpret)


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


def _pad_blocks(a_MC: jax.Array, groups: int, size: int, padded: int) -> jax.Array:
    """[M, groups * size] -> [M, groups * padded]: each group's columns zero-padded to `padded`."""
    if padded == size:
        return a_MC
    a = a_MC.reshape(a_MC.shape[0], groups, size)
    return jnp.pad(a, ((0, 0), (0, 0), (0, padded - size))).reshape(a_MC.shape[0], groups * padded)


def block_sparse_matmul(
    x: jax.Array, blocks: jax.Array, layout: BlockLayout, *, impl: str = "pallas", backend: str | None = None,
    tiles: tuple[int, int, int] | None = None, interpret=None,
) -> jax.Array:
    """x [..., K] @ W [K, N] -> [..., N], W given by `blocks` [nnz, block_k, block_n] in `layout` order.

    impl: pallas (the kernels) or xla (the reference: W materialised; models use `kernels_pallas.choose`
    to pick). backend: triton | tpu (default: the current platform's; on CPU the kernels are interpreted).
    tiles: explicit (tm, tk, tn) instead of `plan`'s."""
    K, N = layout.shape
    if x.shape[-1] != K or blocks.shape != (len(layout.pairs), layout.block_k, layout.block_n):
        raise ValueError(f"x [..., {x.shape[-1]}] and blocks {blocks.shape} do not fit a {layout.shape} layout of "
                         f"{len(layout.pairs)} blocks of {layout.block_k} x {layout.block_n}")
    lead = x.shape[:-1]
    x_MK = x.reshape(-1, K)
    if impl == "xla":
        return block_sparse_reference(x_MK, blocks, layout).reshape(*lead, N)
    if impl != "pallas":
        raise ValueError(f"block_sparse_matmul impl {impl!r}; choose xla or pallas")
    backend, interpret = resolve(backend, interpret)
    M = x_MK.shape[0]
    p = plan(M, layout.block_k, layout.block_n, x.dtype, backend, tiles)
    Mp = round_up(M, max(p.tm, p.dw_tm))
    x_p = _pad_blocks(jnp.pad(x_MK, ((0, Mp - M), (0, 0))), layout.rows, layout.block_k, p.block_k)
    w_p = jnp.pad(blocks.astype(x.dtype), ((0, 0), (0, p.block_k - layout.block_k), (0, p.block_n - layout.block_n)))
    y = _bsmm(x_p, w_p, layout, p, interpret)
    y = y[:M].reshape(M, layout.cols, p.block_n)[:, :, : layout.block_n]
    return y.reshape(*lead, N)
