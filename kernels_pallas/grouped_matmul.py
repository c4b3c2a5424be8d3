"""Grouped matmuls for mixture-of-experts over rows sorted by group (megablox-style `gmm` / `tgmm`).

    out_MN = gmm(lhs_MK, rhs_GKN, group_sizes_G)     # rows of group g times rhs[g]
    d_GKN = tgmm(lhs_MK, dout_MN, group_sizes_G)     # per group: lhs[rows of g]^T @ dout[rows of g]

Groups are consecutive row ranges; zero-size groups are fine; rows past sum(group_sizes) give zeros.
`gmm` runs a program per (row tile, column tile) over the groups that tile overlaps (ranges computed
outside the kernel); `tgmm` a program per (group, K tile, N tile) over that group's rows. On Triton the
programs loop over tiles loaded from global memory; on TPU K (gmm) or the (group, row tile) work items
(tgmm) are the innermost grid axis, accumulated in VMEM, so no block holds a whole K strip. `gmm` is
differentiable: d lhs = gmm(dout, rhs^T), d rhs = tgmm(lhs, dout). `jax.lax.ragged_dot` is the
reference and the CPU path (`impl="xla"`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.backend import TPU_VMEM_BUDGET, compiler_params, pow2_at_least, resolve, round_up, row_tile
from kernels_pallas.choose import matmul_impl


def _group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def _gmm_loop_kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, bm: int, bk: int,
                     bn: int):
    """Triton: a program per (row tile, column tile) loops over the groups its rows overlap and over K tiles,
    loading tiles from the whole arrays in global memory."""
    m, n = pl.program_id(0), pl.program_id(1)
    rows = m * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    row_slice, col_slice = pl.ds(pl.multiple_of(m * bm, bm), bm), pl.ds(pl.multiple_of(n * bn, bn), bn)

    def body(g, acc):
        inside = (rows >= starts_ref[g]) & (rows < ends_ref[g])

        def k_step(t, part):
            ks = pl.ds(pl.multiple_of(t * bk, bk), bk)
            return part + jnp.dot(lhs_ref[row_slice, ks], rhs_ref[g, ks, col_slice], preferred_element_type=jnp.float32)

        part = lax.fori_loop(0, lhs_ref.shape[1] // bk, k_step, jnp.zeros(out_ref.shape, jnp.float32))
        return acc + jnp.where(inside, part, 0.0)

    acc = lax.fori_loop(first_ref[m], last_ref[m], body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gmm_grid_kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, bm: int):
    """TPU: K is the innermost grid axis; each step adds the overlapping groups' (bm, bk) x (bk, bn)
    products into a VMEM accumulator (rhs block: every group's (bk, bn) tile)."""
    m, k = pl.program_id(0), pl.program_id(2)
    rows = m * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(g, acc):
        inside = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        return acc + jnp.where(inside, jnp.dot(lhs_ref[...], rhs_ref[g], preferred_element_type=jnp.float32), 0.0)

    acc_ref[...] += lax.fori_loop(first_ref[m], last_ref[m], body, jnp.zeros(acc_ref.shape, jnp.float32))

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _gmm_call(lhs, rhs, group_sizes, bm: int, bk: int, bn: int, backend: str, interpret):
    M, K = lhs.shape
    G, _, N = rhs.shape
    starts, ends = _group_bounds(group_sizes)
    tile_start = jnp.arange(M // bm, dtype=jnp.int32) * bm
    first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)  # first group ending after the tile start
    last = jnp.searchsorted(starts, tile_start + bm, side="left").astype(jnp.int32)  # groups starting before its end
    out_shape = jax.ShapeDtypeStruct((M, N), lhs.dtype)
    if backend == "triton":
        anywhere = pl.BlockSpec(memory_space=pl.ANY)
        return pl.pallas_call(
            functools.partial(_gmm_loop_kernel, bm=bm, bk=bk, bn=bn), grid=(M // bm, N // bn), in_specs=[anywhere] * 6,
            out_specs=pl.BlockSpec((bm, bn), lambda m, n: (m, n)), out_shape=out_shape, interpret=interpret,
            compiler_params=compiler_params("triton", num_warps=4, num_stages=3), name="gmm",
        )(first, last, starts, ends, lhs, rhs)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(M // bm, N // bn, K // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda m, n, k, *_: (m, k)), pl.BlockSpec((G, bk, bn), lambda m, n, k, *_: (0, k, n))],
        out_specs=pl.BlockSpec((bm, bn), lambda m, n, k, *_: (m, n)), scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_gmm_grid_kernel, bm=bm), grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")), name="gmm",
    )(first, last, starts, ends, lhs, rhs)


def _tgmm_loop_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, bm: int, bk: int, bn: int):
    """Triton: a program per (group, K tile, N tile) loops over the group's rows from its first row."""
    g, k, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    k_slice, n_slice = pl.ds(pl.multiple_of(k * bk, bk), bk), pl.ds(pl.multiple_of(n * bn, bn), bn)

    def body(t, acc):
        r0 = start + t * bm
        inside = (r0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < end
        x = jnp.where(inside, lhs_ref[pl.ds(r0, bm), k_slice], 0)
        d = dout_ref[pl.ds(r0, bm), n_slice]
        return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, lax.div(end - start + bm - 1, bm), body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_grid_kernel(group_ref, tile_ref, flags_ref, starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, acc_ref, *,
                      bm: int):
    """TPU: one grid step per (group, row tile) work item (innermost axis; megablox-style), accumulated in
    VMEM from a group's first tile to its last. flags: 1 valid, 2 first of its group, 4 last."""
    i = pl.program_id(2)
    flags, g = flags_ref[i], group_ref[i]

    @pl.when(flags & 2 != 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(flags & 1 != 0)
    def _():
        rows = tile_ref[i] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        x = jnp.where((rows >= starts_ref[g]) & (rows < ends_ref[g]), lhs_ref[...], 0)
        acc_ref[...] += lax.dot_general(x, dout_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(flags & 4 != 0)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _work_items(starts, ends, tiles: int, bm: int):
    """(group, row tile, flags) per work item, [tiles + G] int32 each: every group's row tiles in order; the
    items past the last repeat it with flags 0 (nothing fetched, nothing computed)."""
    G = starts.shape[0]
    count = jnp.where(ends > starts, (ends - 1) // bm - starts // bm + 1, 0)
    offset_end = jnp.cumsum(count)
    item = jnp.arange(tiles + G)
    valid = item < offset_end[-1]
    last_valid = jnp.maximum(offset_end[-1] - 1, 0)
    item = jnp.where(valid, item, last_valid)
    group = jnp.minimum(jnp.searchsorted(offset_end, item, side="right"), G - 1)
    t = item - (offset_end - count)[group]
    tile = jnp.minimum(starts[group] // bm + t, tiles - 1)
    first, last = valid & (t == 0), valid & (t == count[group] - 1)
    flags = valid.astype(jnp.int32) | (first.astype(jnp.int32) << 1) | (last.astype(jnp.int32) << 2)
    return group.astype(jnp.int32), tile.astype(jnp.int32), flags


def _tgmm_call(lhs, dout, group_sizes, bm: int, bk: int, bn: int, backend: str, interpret):
    M, K = lhs.shape
    N = dout.shape[1]
    G = group_sizes.shape[0]
    starts, ends = _group_bounds(group_sizes)
    out_shape = jax.ShapeDtypeStruct((G, K, N), lhs.dtype)
    if backend == "triton":
        lhs = jnp.pad(lhs, ((0, bm), (0, 0)))  # a group's last tile may read past M: zeros, masked anyway
        dout = jnp.pad(dout, ((0, bm), (0, 0)))
        anywhere = pl.BlockSpec(memory_space=pl.ANY)
        return pl.pallas_call(
            functools.partial(_tgmm_loop_kernel, bm=bm, bk=bk, bn=bn), grid=(G, K // bk, N // bn), in_specs=[anywhere] * 4,
            out_specs=pl.BlockSpec((pl.Squeezed(), bk, bn), lambda g, k, n: (g, k, n)), out_shape=out_shape,
            interpret=interpret, compiler_params=compiler_params("triton", num_warps=4, num_stages=3), name="tgmm",
        )(starts, ends, lhs, dout)
    lhs, dout = _padded_rows(lhs, bm), _padded_rows(dout, bm)
    group, tile, flags = _work_items(starts, ends, lhs.shape[0] // bm, bm)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(K // bk, N // bn, group.shape[0]),
        in_specs=[pl.BlockSpec((bm, bk), lambda k, n, i, group, tile, *_: (tile[i], k)),
                  pl.BlockSpec((bm, bn), lambda k, n, i, group, tile, *_: (tile[i], n))],
        out_specs=pl.BlockSpec((pl.Squeezed(), bk, bn), lambda k, n, i, group, *_: (group[i], k, n)),
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_tgmm_grid_kernel, bm=bm), grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=compiler_params("tpu", dimension_semantics=("parallel", "parallel", "arbitrary")), name="tgmm",
    )(group, tile, flags, starts, ends, lhs, dout)
    return jnp.where((group_sizes > 0)[:, None, None], out, 0)  # empty groups' blocks are never written


def _tile(n: int, preferred: int, backend: str) -> tuple[int, int]:
    """(tile, n padded to whole tiles). Triton: a power of two >= 16, n padded up to it; TPU: the largest
    multiple of 128 up to max(preferred, 512) dividing n, else n whole (a block dim Mosaic accepts)."""
    if backend == "triton":
        t = min(pow2_at_least(preferred), pow2_at_least(n))
        return t, round_up(n, t)
    return next((t for t in range(max(preferred, 512), 127, -128) if n % t == 0), n), n  # TPU lanes: 128s or whole


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, tiles, backend, interpret):
    bm, bk, bn = tiles
    return _gmm_call(lhs, rhs, group_sizes, bm, bk, bn, backend, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, tiles, backend, interpret):
    return _gmm(lhs, rhs, group_sizes, tiles, backend, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiles, backend, interpret, res, dout):
    lhs, rhs, group_sizes = res
    bm, bk, bn = tiles
    dlhs = _gmm_call(dout.astype(lhs.dtype), rhs.transpose(0, 2, 1), group_sizes, bm, bn, bk, backend, interpret)
    drhs = _tgmm_call(lhs, dout.astype(lhs.dtype), group_sizes, bm, bk, bn, backend, interpret)
    return dlhs, drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_tiled(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, bm: int | None = None) -> jax.Array:
    """Grouped matmul in plain XLA without ragged_dot (which XLA:CPU runs as G dense matmuls over all rows):
    each group's rows padded to whole tiles of bm rows, so every tile belongs to one group, then one
    batched matmul of the tiles with their group's weights gathered per tile. Costs (M + G bm) K N FLOPs;
    bm defaults to a quarter of the mean group size (>= 8). Rows past the last group give zeros."""
    M, K = lhs_MK.shape
    G, _, N = rhs_GKN.shape
    bm = bm or max(8, -(-M // (4 * G)) // 8 * 8)
    tiles = -(-M // bm) + G  # enough for any group sizes summing to <= M
    sizes = group_sizes_G.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    padded = -(-sizes // bm) * bm
    padded_starts = jnp.cumsum(padded) - padded
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(M), side="right")  # G for rows past the groups
    inside = group < G
    g = jnp.minimum(group, G - 1)
    dest = jnp.where(inside, padded_starts[g] + jnp.arange(M) - starts[g], tiles * bm)  # past the end: dropped
    x = jnp.zeros((tiles * bm, K), lhs_MK.dtype).at[dest].set(lhs_MK, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(tiles) * bm, side="right"), G - 1)
    y = jnp.einsum("tbk,tkn->tbn", x.reshape(tiles, bm, K), rhs_GKN[tile_group].astype(lhs_MK.dtype),
                   preferred_element_type=jnp.float32).astype(lhs_MK.dtype)
    return jnp.where(inside[:, None], y.reshape(tiles * bm, N).at[dest].get(mode="fill", fill_value=0), 0)


def _resolve(impl: str, backend: str | None, interpret) -> tuple[str, str, object]:
    impl = matmul_impl(impl, what="grouped matmul", fits=True, cpu="tiled")
    if impl not in ("xla", "tiled", "pallas"):
        raise ValueError(f"grouped matmul impl {impl!r}; choose xla, tiled, pallas or auto")
    return (impl, *resolve(backend, interpret))


def _padded_rows(x: jax.Array, bm: int) -> jax.Array:
    return jnp.pad(x, ((0, -x.shape[0] % bm), (0, 0)))


def gmm(
    lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *, tiles: tuple[int, int, int] = (64, 128, 128),
    impl: str = "auto", backend: str | None = None, interpret=None,
) -> jax.Array:
    """[M, K] rows sorted by group x [G, K, N] -> [M, N]; `tiles` = preferred (rows, K, N) tile sizes;
    `backend` triton | tpu (default: the current platform's).

    impl: pallas (the kernels), xla (`lax.ragged_dot`), tiled (`gmm_tiled`), auto (`kernels_pallas.choose`:
    pallas on GPU/TPU, tiled on CPU, where ragged_dot does G times the work)."""
    impl, backend, interpret = _resolve(impl, backend, interpret)
    M, K = lhs_MK.shape
    if rhs_GKN.shape[1] != K or rhs_GKN.shape[0] != group_sizes_G.shape[0]:
        raise ValueError(f"gmm: lhs {lhs_MK.shape}, rhs {rhs_GKN.shape} and group_sizes {group_sizes_G.shape} disagree")
    if impl == "xla":
        return lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32))
    if impl == "tiled":
        return gmm_tiled(lhs_MK, rhs_GKN, group_sizes_G)
    N = rhs_GKN.shape[2]
    bm = row_tile(M, tiles[0], backend)
    (bk, Kp), (bn, Np) = _tile(K, tiles[1], backend), _tile(N, tiles[2], backend)
    while backend == "tpu" and 2 * rhs_GKN.shape[0] * bk * bn * lhs_MK.dtype.itemsize > TPU_VMEM_BUDGET // 2 \
            and bk % 256 == 0:  # every group's (bk, bn) weight tile is in VMEM, double-buffered
        bk //= 2
    lhs = jnp.pad(_padded_rows(lhs_MK, bm), ((0, 0), (0, Kp - K)))
    rhs = jnp.pad(rhs_GKN.astype(lhs_MK.dtype), ((0, 0), (0, Kp - K), (0, Np - N)))
    out = _gmm(lhs, rhs, group_sizes_G.astype(jnp.int32), (bm, bk, bn), backend, interpret)
    return out[:M, :N]


def tgmm(
    lhs_MK: jax.Array, dout_MN: jax.Array, group_sizes_G: jax.Array, *, tiles: tuple[int, int, int] = (64, 128, 128),
    impl: str = "auto", backend: str | None = None, interpret=None,
) -> jax.Array:
    """Per group g: lhs[rows of g]^T @ dout[rows of g] -> [G, K, N] (zeros for empty groups)."""
    impl, backend, interpret = _resolve(impl, backend, interpret)
    K, N, G = lhs_MK.shape[1], dout_MN.shape[1], group_sizes_G.shape[0]
    if impl in ("xla", "tiled"):
        zeros = jnp.zeros((G, K, N), lhs_MK.dtype)
        return jax.grad(lambda w: jnp.sum(gmm(lhs_MK, w, group_sizes_G, impl=impl) * dout_MN))(zeros)
    bm = row_tile(lhs_MK.shape[0], tiles[0], backend)
    (bk, Kp), (bn, Np) = _tile(K, tiles[1], backend), _tile(N, tiles[2], backend)
    lhs = jnp.pad(lhs_MK, ((0, 0), (0, Kp - K)))
    dout = jnp.pad(dout_MN.astype(lhs_MK.dtype), ((0, 0), (0, Np - N)))
    return _tgmm_call(lhs, dout, group_sizes_G.astype(jnp.int32), bm, bk, bn, backend, interpret)[:, :K, :N]
