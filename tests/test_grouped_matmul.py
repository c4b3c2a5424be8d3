"""Grouped matmul kernels (interpret mode) against `jax.lax.ragged_dot`: values and gradients over
property-based group sizes, zero-size groups and rows past the last group included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.grouped_matmul import gmm, tgmm

TOL = 1e-5  # f32, scaled by sqrt(contracted size)


def _reference_tgmm(lhs, dout, sizes):
    zeros = jnp.zeros((len(sizes), lhs.shape[1], dout.shape[1]))
    return jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(lhs, w, sizes) * dout))(zeros)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6), extra=st.integers(0, 5),
       K=st.sampled_from([8, 16, 24]), N=st.sampled_from([8, 16, 24]), bm=st.sampled_from([8, 16]),
       seed=st.integers(0, 1000))
def test_gmm_and_tgmm_match_ragged_dot(sizes, extra, K, N, bm, seed):
    M = sum(sizes) + extra
    if M == 0:
        return
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), K, N)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    tiles = (bm, 8, 8)
    want = jax.lax.ragged_dot(lhs, rhs, gs)
    got = gmm(lhs, rhs, gs, tiles=tiles, impl="pallas")
    np.testing.assert_allclose(got, want, atol=TOL * np.sqrt(K))
    np.testing.assert_allclose(got[sum(sizes):], 0.0)  # rows past the last group
    np.testing.assert_allclose(tgmm(lhs, dout, gs, tiles=tiles, impl="pallas"), _reference_tgmm(lhs, dout, gs),
                               atol=TOL * np.sqrt(M))
    loss = lambda f: lambda a, b: jnp.sum(f(a, b) * dout)
    g = jax.grad(loss(lambda a, b: gmm(a, b, gs, tiles=tiles, impl="pallas")), argnums=(0, 1))(lhs, rhs)
    r = jax.grad(loss(lambda a, b: jax.lax.ragged_dot(a, b, gs)), argnums=(0, 1))(lhs, rhs)
    np.testing.assert_allclose(g[0], r[0], atol=TOL * np.sqrt(N))
    np.testing.assert_allclose(g[1], r[1], atol=TOL * np.sqrt(M))
    # the plain-XLA tiled path (the CPU default): same values (its gradients: test_xla_path_and_errors)
    np.testing.assert_allclose(gmm(lhs, rhs, gs, impl="tiled"), want, atol=TOL * np.sqrt(K))


def test_zero_size_groups_get_zero_gradients():
    lhs = jnp.ones((16, 8))
    rhs = jnp.ones((4, 8, 8))
    gs = jnp.asarray([0, 10, 0, 6], jnp.int32)
    g = jax.grad(lambda b: gmm(lhs, b, gs, tiles=(8, 8, 8), impl="pallas").sum())(rhs)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_array_equal(g[2], 0.0)
    np.testing.assert_allclose(g[1], 10.0)


def test_xla_path_and_errors():
    lhs, rhs, gs = jnp.ones((6, 8)), jnp.ones((2, 8, 4)), jnp.asarray([3, 3])
    np.testing.assert_allclose(gmm(lhs, rhs, gs, impl="xla"), jax.lax.ragged_dot(lhs, rhs, gs))
    with pytest.raises(ValueError, match="disagree"):
        gmm(lhs, jnp.ones((3, 8, 4)), gs)
    from kernels_pallas.grouped_matmul import gmm_tiled

    rng = np.random.default_rng(3)  # every tile size, groups of 0..13 rows and 5 rows past the last group
    lhs, rhs = jnp.asarray(rng.standard_normal((40, 8)), jnp.float32), jnp.asarray(rng.standard_normal((4, 8, 4)), jnp.float32)
    sizes = jnp.asarray([13, 0, 12, 10], jnp.int32)
    for bm in (8, 16, 64):
        np.testing.assert_allclose(gmm_tiled(lhs, rhs, sizes, bm), jax.lax.ragged_dot(lhs, rhs, sizes), atol=1e-5)
    dout = jnp.asarray(rng.standard_normal((40, 4)), jnp.float32)
    loss = lambda f: lambda a, b: jnp.sum(f(a, b) * dout)
    got = jax.grad(loss(lambda a, b: gmm(a, b, sizes, impl="tiled")), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(loss(lambda a, b: jax.lax.ragged_dot(a, b, sizes)), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    np.testing.assert_allclose(tgmm(lhs, dout, sizes, impl="tiled"), _reference_tgmm(lhs, dout, sizes), atol=1e-5)
    with pytest.raises(ValueError, match="impl 'triton'"):
        gmm(lhs, rhs, gs, impl="triton")


@pytest.mark.parametrize("sizes", [[10, 0, 22], [0, 0, 35], [0, 0, 0], [5, 27, 3]])
def test_tpu_interpret_mode(sizes):
    """The TPU-style kernels (K innermost for gmm, (group, row tile) work items for tgmm, VMEM accumulators)
    in TPU interpret mode: 5 K tiles, rows past the groups, empty groups and no rows at all."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((37, 640)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 640, 128)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal((37, 128)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    kw = dict(tiles=(8, 128, 128), impl="pallas", backend="tpu", interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(gmm(lhs, rhs, gs, **kw), jax.lax.ragged_dot(lhs, rhs, gs), atol=1e-4)
    np.testing.assert_allclose(tgmm(lhs, dout, gs, **kw), _reference_tgmm(lhs, dout, gs), atol=1e-4)
