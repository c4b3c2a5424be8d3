"""Block-sparse matmul kernels (interpret mode) against the dense reference: values, dX and dW over
property-based block layouts, including empty block rows/columns and a shuffled block diagonal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.block_sparse_matmul import BlockLayout, block_sparse_matmul, block_sparse_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def _check(layout: BlockLayout, M: int, dtype=jnp.float32, seed=0, block_m=None):
    rng = np.random.default_rng(seed)
    K, N = layout.shape
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    blocks = jnp.asarray(rng.standard_normal((len(layout.pairs), layout.block_k, layout.block_n)), dtype)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    run = lambda x, b: block_sparse_matmul(x, b, layout, impl="pallas", block_m=block_m)
    ref = lambda x, b: block_sparse_reference(x, b, layout)
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(run(x, blocks), np.float32), np.asarray(ref(x, blocks), np.float32),
                               atol=tol * np.sqrt(K), rtol=0)
    loss = lambda f: lambda x, b: jnp.sum(f(x, b).astype(jnp.float32) * dy)
    (gx, gb), (rx, rb) = (jax.grad(loss(f), argnums=(0, 1))(x, blocks) for f in (run, ref))
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(rx, np.float32), atol=tol * np.sqrt(N))
    np.testing.assert_allclose(np.asarray(gb, np.float32), np.asarray(rb, np.float32), atol=tol * np.sqrt(M))


@settings(max_examples=12, deadline=None)
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
    _check(layout, 33, block_m=16)


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


def test_tpu_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    layout = BlockLayout.from_mask(np.array([[1, 0, 1], [0, 1, 1]], bool), 8, 128)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 8, 128)), jnp.float32)
    run = lambda x, b: block_sparse_matmul(x, b, layout, impl="pallas", interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(run(x, b), block_sparse_reference(x, b, layout), atol=1e-4)
    g = jax.grad(lambda x, b: run(x, b).sum(), argnums=(0, 1))(x, b)
    r = jax.grad(lambda x, b: block_sparse_reference(x, b, layout).sum(), argnums=(0, 1))(x, b)
    for a, c in zip(g, r):
        np.testing.assert_allclose(a, c, atol=1e-4)
