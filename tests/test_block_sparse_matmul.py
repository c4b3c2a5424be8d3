"""Block-sparse matmul kernels (interpret mode) against the dense reference: values, dX and dW over
property-based block layouts, including empty block rows/columns and a shuffled block diagonal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import pallas_block_shapes
from kernels_pallas.block_sparse_matmul import BlockLayout, block_sparse_matmul, block_sparse_reference, plan

# f32: |kernel - reference| <= 1e-5 * sqrt(reduction length) (both accumulate in f32; only the summation order
# differs). bf16: inputs and outputs in bf16, accumulation in f32 on both sides, so they differ by output
# rounding: <= 2^-7 (two bf16 ulps) of the largest reference magnitude.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7}


def _close(got, want, dtype, length):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    atol = TOL[dtype] * (np.sqrt(length) if dtype == jnp.float32 else np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def _check(layout: BlockLayout, M: int, dtype=jnp.float32, seed=0, tiles=None, backend=None):
    """Values, dX and dW of the kernel vs the dense reference, with a random cotangent."""
    rng = np.random.default_rng(seed)
    K, N = layout.shape
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    blocks = jnp.asarray(rng.standard_normal((len(layout.pairs), layout.block_k, layout.block_n)), dtype)
    dy = jnp.asarray(rng.standard_normal((M, N)), dtype)
    run = lambda x, b: block_sparse_matmul(x, b, layout, impl="pallas", tiles=tiles, backend=backend)
    y, vjp = jax.vjp(run, x, blocks)
    y_ref, vjp_ref = jax.vjp(lambda x, b: block_sparse_reference(x, b, layout), x, blocks)
    _close(y, y_ref, dtype, K)
    (gx, gb), (rx, rb) = vjp(dy), vjp_ref(dy)
    _close(gx, rx, dtype, N)
    _close(gb, rb, dtype, M)


@settings(max_examples=2, deadline=None)  # each example compiles its own shapes
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), bk=st.sampled_from([8, 16]), bn=st.sampled_from([8, 16]),
       M=st.integers(1, 40), seed=st.integers(0, 1000), data=st.data())
def test_any_block_mask(rows, cols, bk, bn, M, seed, data):
    mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))).reshape(rows, cols)
    if not mask.any():
        mask[0, 0] = True
    _check(BlockLayout.from_mask(mask, bk, bn), M, seed=seed)


@pytest.mark.parametrize("permutation", [None, (2, 0, 3, 1)])
def test_block_diagonal_and_shuffled(permutation):
    layout = BlockLayout.block_diagonal(4, 16, 8, permutation)
    assert layout.density == 0.25
    _check(layout, 33, tiles=(16, 16, 16))


def test_bf16_and_batched_inputs():
    layout = BlockLayout.block_diagonal(2, 16, 16)
    _check(layout, 24, dtype=jnp.bfloat16)
    x = jnp.ones((2, 3, 32))
    blocks = jnp.ones((2, 16, 16))
    assert block_sparse_matmul(x, blocks, layout, impl="pallas").shape == (2, 3, 32)


def test_bad_layouts_and_shapes():
    with pytest.raises(ValueError, match="no duplicates"):
        BlockLayout(2, 2, ((0, 0), (0, 0)), 8, 8)
    with pytest.raises(ValueError, match="within 2 x 2"):
        BlockLayout(2, 2, ((0, 2),), 8, 8)
    with pytest.raises(ValueError, match="not a permutation"):
        BlockLayout.block_diagonal(3, 8, 8, (0, 0, 1))
    layout = BlockLayout.block_diagonal(2, 8, 8)
    with pytest.raises(ValueError, match="do not fit"):
        block_sparse_matmul(jnp.ones((4, 15)), jnp.ones((2, 8, 8)), layout)
    with pytest.raises(ValueError, match="powers of two"):
        block_sparse_matmul(jnp.ones((4, 16)), jnp.ones((2, 8, 8)), layout, backend="triton", tiles=(8, 8, 8))
    with pytest.raises(ValueError, match="multiples of 128"):
        block_sparse_matmul(jnp.ones((4, 16)), jnp.ones((2, 8, 8)), layout, backend="tpu", tiles=(8, 8, 8))


def _layout(kind: str, n: int, bk: int, bn: int) -> BlockLayout:
    if kind == "diagonal":
        return BlockLayout.block_diagonal(n, bk, bn)
    if kind == "shuffled":
        return BlockLayout.block_diagonal(n, bk, bn, tuple(np.random.default_rng(n).permutation(n)))
    mask = np.random.default_rng(bk + bn).random((n, n)) < 0.5
    mask[0, 0] = True
    return BlockLayout.from_mask(mask, bk, bn)


# Realistic and awkward blocks, each with a layout kind, and tiles smaller than the blocks where the blocks
# allow (Triton tiles are powers of two >= 16, TPU K/N tiles multiples of 128): every kernel then sums
# several tiles per block, and blocks whose size no tile divides (235) are padded.
BLOCKS = [((8, 8), "random", 3, None, None), ((16, 8), "shuffled", 3, None, None),
          ((128, 128), "diagonal", 2, (16, 32, 64), (8, 128, 128)),
          ((512, 235), "shuffled", 2, (16, 128, 64), (8, 256, 128)),
          ((256, 2048), "random", 2, (16, 64, 512), (8, 128, 512)),
          ((1024, 1024), "diagonal", 2, (32, 256, 256), (16, 512, 256))]


# the tiny (8x8), square (128x128), large (1024x1024) and wide (256x2048) blocks run in the slow set; an odd and a
# small oblong one here
@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("blocks,kind,n,triton_tiles,tpu_tiles", [
    pytest.param(*b, marks=pytest.mark.slow) if b[0] in ((8, 8), (128, 128), (1024, 1024), (256, 2048)) else b
    for b in BLOCKS],
    ids=[f"{b[0][0]}x{b[0][1]}" for b in BLOCKS])
def test_blocks_of_every_size_in_both_kernel_styles(blocks, kind, n, triton_tiles, tpu_tiles, backend):
    """Triton-style kernels in interpret mode, TPU-style ones in TPU interpret mode (scalar prefetch,
    grid-step accumulation)."""
    _check(_layout(kind, n, *blocks), 24, tiles=triton_tiles if backend == "triton" else tpu_tiles,
           backend=backend, seed=blocks[0])


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_bf16_with_the_default_plan(backend):
    _check(BlockLayout.block_diagonal(2, 512, 235, (1, 0)), 40, dtype=jnp.bfloat16, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_plan_stays_within_on_chip_budgets(backend, dtype):
    """Blocks 128-4096 (and awkward sizes), d_model and d_ff up to 8192 / 28672, any row count: the bytes a
    program holds stay under the budget (GPU shared memory 200 KiB, TPU VMEM 16 MiB), the tiles divide the
    padded blocks and never exceed the largest tile of the backend."""
    budget = 200 * 1024 if backend == "triton" else 16 * 2**20
    largest = 128 if backend == "triton" else 512
    for M in (1, 333, 16384):
        for bk in (128, 235, 512, 1000, 1408, 2048, 4096):
            for bn in (128, 235, 512, 1408, 4096):
                p = plan(M, bk, bn, dtype, backend)
                assert p.fits and p.bytes <= budget, (M, bk, bn, p)
                assert p.block_k % p.tk == 0 and p.block_n % p.tn == 0 and p.block_k - bk < p.tk and p.block_n - bn < p.tn
                assert max(p.tm, p.tk, p.tn, p.dw_tm) <= largest


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_no_block_spec_covers_a_block_the_weight_or_a_k_strip(backend):
    """Forward and backward at blocks larger than any tile: every block a program receives is a tile."""
    layout = BlockLayout.block_diagonal(2, 1024, 2048)
    K, N = layout.shape

    def fwd_bwd(x, b, dy):
        y, vjp = jax.vjp(lambda x, b: block_sparse_matmul(x, b, layout, backend=backend, interpret=False), x, b)
        return y, vjp(dy)

    shapes = pallas_block_shapes(fwd_bwd, jnp.zeros((256, K), jnp.bfloat16), jnp.zeros((2, 1024, 2048), jnp.bfloat16),
                                  jnp.zeros((256, N), jnp.bfloat16))
    assert len(shapes) >= 3
    for block, array in shapes:
        assert max(block) <= 512, (block, array)
        assert block[-1] < array[-1] or array[-1] <= 512, (block, array)  # never a whole K / N strip
