"""Block-sparse matmul y = x @ W, W [K, N] stored as dense blocks [nnz, bk, bn] with a static layout.

    layout = BlockLayout.block_diagonal(4, block_k=64, block_n=64)   # or .from_mask(mask, bk, bn)
    y_MN = block_sparse_matmul(x_MK, blocks, layout)                 # differentiable in x and blocks

Forward, dX (= dY W^T) and dW kernels each touch only the stored blocks: a program per (row tile,
output block) loops over the stored blocks of that block column (forward) or block row (dX); dW runs
a program per stored block, reducing over row tiles. The layout's index tables are inputs, so one
compiled kernel serves every block column. `block_sparse_reference` materialises W for comparison.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.tiling import check_gpu_tile, row_tile


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

    def tables(self, by: str) -> tuple[np.ndarray, np.ndarray]:
        """(index [groups, most] int32 of stored blocks per block column (by='col') or row, padded with 0;
        count [groups] int32)."""
        axis = 1 if by == "col" else 0
        groups = self.cols if by == "col" else self.rows
        members = [[i for i, p in enumerate(self.pairs) if p[axis] == g] for g in range(groups)]
        most = max(1, max(len(m) for m in members))
        index = np.zeros((groups, most), np.int32)
        for g, m in enumerate(members):
            index[g, : len(m)] = m
        return index, np.asarray([len(m) for m in members], np.int32)

    def dense(self, blocks: jax.Array) -> jax.Array:
        """The full matrix [K, N] with zeros outside the stored blocks."""
        grid = jnp.zeros((self.rows, self.cols, self.block_k, self.block_n), blocks.dtype)
        r, c = np.asarray(self.pairs).T
        grid = grid.at[r, c].set(blocks)
        return grid.transpose(0, 2, 1, 3).reshape(self.shape)


def block_sparse_reference(x_MK: jax.Array, blocks: jax.Array, layout: BlockLayout) -> jax.Array:
    """x @ W with W materialised from its blocks (the pure-JAX reference)."""
    return jnp.dot(x_MK, layout.dense(blocks).astype(x_MK.dtype), preferred_element_type=jnp.float32).astype(x_MK.dtype)


def _rows_of(layout: BlockLayout, side: int) -> np.ndarray:
    return np.asarray([p[side] for p in layout.pairs], np.int32)


def _gather_kernel(index_ref, count_ref, other_ref, a_ref, w_ref, o_ref, *, bsize: int, transpose: bool):
    """o[tile, g] = sum over stored blocks i of group g: a[tile, block other(i)] @ (W_i or W_i^T)."""
    g = pl.program_id(1)

    def body(t, acc):
        i = index_ref[g, t]
        start = pl.multiple_of(other_ref[i] * bsize, bsize)
        a = a_ref[:, pl.ds(start, bsize)]
        w = w_ref[i]
        dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, count_ref[g], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _gather_call(a, blocks, index, count, other, out_cols: int, bsize: int, out_bsize: int, bm: int, transpose: bool,
                 interpret):
    M = a.shape[0]
    full = lambda arr: pl.BlockSpec(arr.shape, lambda m, g: (0,) * arr.ndim)
    return pl.pallas_call(
        functools.partial(_gather_kernel, bsize=bsize, transpose=transpose),
        grid=(M // bm, out_cols // out_bsize),
        in_specs=[full(index), full(count), full(other), pl.BlockSpec((bm, a.shape[1]), lambda m, g: (m, 0)),
                  full(blocks)],
        out_specs=pl.BlockSpec((bm, out_bsize), lambda m, g: (m, g)),
        out_shape=jax.ShapeDtypeStruct((M, out_cols), a.dtype), interpret=interpret,
        name="block_sparse_matmul_dx" if transpose else "block_sparse_matmul",
    )(index, count, other, a, blocks)


def _dw_kernel(rows_ref, cols_ref, x_ref, dy_ref, dw_ref, *, bm: int, bk: int, bn: int):
    i = pl.program_id(0)
    r0 = pl.multiple_of(rows_ref[i] * bk, bk)
    c0 = pl.multiple_of(cols_ref[i] * bn, bn)

    def body(t, acc):
        ms = pl.ds(pl.multiple_of(t * bm, bm), bm)
        x = x_ref[ms, pl.ds(r0, bk)]
        dy = dy_ref[ms, pl.ds(c0, bn)]
        return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, x_ref.shape[0] // bm, body, jnp.zeros((bk, bn), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _dw_call(x, dy, layout: BlockLayout, dtype, bm: int, interpret):
    rows, cols = _rows_of(layout, 0), _rows_of(layout, 1)
    full = lambda arr: pl.BlockSpec(arr.shape, lambda i: (0,) * arr.ndim)
    nnz, bk, bn = len(layout.pairs), layout.block_k, layout.block_n
    return pl.pallas_call(
        functools.partial(_dw_kernel, bm=bm, bk=bk, bn=bn), grid=(nnz,),
        in_specs=[full(rows), full(cols), full(x), full(dy)],
        out_specs=pl.BlockSpec((pl.Squeezed(), bk, bn), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((nnz, bk, bn), dtype), interpret=interpret, name="block_sparse_matmul_dw",
    )(rows, cols, x, dy)


def _forward(x, blocks, layout: BlockLayout, bm: int, interpret):
    index, count = layout.tables("col")
    return _gather_call(x, blocks, index, count, _rows_of(layout, 0), layout.shape[1], layout.block_k,
                        layout.block_n, bm, False, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bsmm(x, blocks, layout, bm, interpret):
    return _forward(x, blocks, layout, bm, interpret)


def _bsmm_fwd(x, blocks, layout, bm, interpret):
    return _forward(x, blocks, layout, bm, interpret), (x, blocks)


def _bsmm_bwd(layout, bm, interpret, res, dy):
    x, blocks = res
    index, count = layout.tables("row")
    dx = _gather_call(dy, blocks, index, count, _rows_of(layout, 1), layout.shape[0], layout.block_n,
                      layout.block_k, bm, True, interpret)
    return dx, _dw_call(x, dy, layout, blocks.dtype, bm, interpret)


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


def block_sparse_matmul(
    x: jax.Array, blocks: jax.Array, layout: BlockLayout, *, block_m: int | None = None, impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """x [..., K] @ W [K, N] -> [..., N], W given by `blocks` [nnz, block_k, block_n] in `layout` order.

    impl: pallas (the kernels; interpret mode on CPU unless `interpret` says otherwise), xla (the
    reference: W materialised), auto (pallas on GPU/TPU, xla on CPU)."""
    K, N = layout.shape
    if x.shape[-1] != K or blocks.shape != (len(layout.pairs), layout.block_k, layout.block_n):
        raise ValueError(f"x [..., {x.shape[-1]}] and blocks {blocks.shape} do not fit a {layout.shape} layout of "
                         f"{len(layout.pairs)} blocks of {layout.block_k} x {layout.block_n}")
    platform = jax.devices()[0].platform
    if impl == "auto":
        impl = "xla" if platform == "cpu" else "pallas"
    lead = x.shape[:-1]
    x_MK = x.reshape(-1, K)
    if impl == "xla":
        return block_sparse_reference(x_MK, blocks, layout).reshape(*lead, N)
    if impl != "pallas":
        raise ValueError(f"block_sparse_matmul impl {impl!r}; choose xla, pallas or auto")
    M = x_MK.shape[0]
    bm = block_m or row_tile(M, 128)
    check_gpu_tile("block_m", bm)
    Mp = -(-M // bm) * bm
    x_MK = jnp.pad(x_MK, ((0, Mp - M), (0, 0)))
    y = _bsmm(x_MK, blocks.astype(x.dtype), layout, bm, platform == "cpu" if interpret is None else interpret)
    return y[:M].reshape(*lead, N)
