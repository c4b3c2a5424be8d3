"""Grouped matmul kernels (interpret mode) against a numpy loop over groups (and `jax.lax.ragged_dot`): values
and gradients over property-based group sizes, zero-size groups and rows past the last group included."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels_pallas.grouped_matmul import gmm, tgmm

TOL = 1e-5  # f32, scaled by sqrt(contracted size)


def _np_gmm(lhs, rhs, sizes):
    """Rows of group g times rhs[g], rows past the last group zero: [M, N], in numpy."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, n in enumerate(sizes):
        out[start:start + n] = lhs[start:start + n] @ rhs[g]
        start += n
    return out


def _np_tgmm(lhs, dout, sizes):
    """Per group g: lhs[rows of g].T @ dout[rows of g]: [G, K, N], in numpy (gmm's weight gradient)."""
    lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
    out, start = np.zeros((len(sizes), lhs.shape[1], dout.shape[1])), 0
    for g, n in enumerate(sizes):
        out[g] = lhs[start:start + n].T @ dout[start:start + n]
        start += n
    return out


@partial(jax.jit, static_argnames="tiles")
def _pallas_values_and_grads(lhs, rhs, dout, gs, tiles):
    """gmm, tgmm and gmm's gradients, compiled once per shape and reused across the group sizes drawn."""
    grads = jax.grad(lambda a, b: jnp.sum(gmm(a, b, gs, tiles=tiles, impl="pallas") * dout), argnums=(0, 1))(lhs, rhs)
    return gmm(lhs, rhs, gs, tiles=tiles, impl="pallas"), tgmm(lhs, dout, gs, tiles=tiles, impl="pallas"), grads


# Shapes are few (M 64, 4 groups, two (K, N), two row tiles: 4 compiled kernels) while the group sizes, which
# the kernels read at run time, vary freely: empty groups, groups across tile edges, rows past the last group.
@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 16), min_size=4, max_size=4), KN=st.sampled_from([(8, 24), (24, 8)]),
       bm=st.sampled_from([8, 16]), seed=st.integers(0, 1000))
@example(sizes=[16, 16, 16, 16], KN=(8, 24), bm=16, seed=0)  # no rows past the last group
@example(sizes=[0, 0, 0, 0], KN=(24, 8), bm=8, seed=0)  # no rows in any group
def test_gmm_and_tgmm_match_a_numpy_loop(sizes, KN, bm, seed):
    (K, N), M = KN, 64
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), K, N)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    tiles = (bm, 8, 8)
    want = _np_gmm(lhs, rhs, sizes)
    out, t_out, (d_lhs, d_rhs) = _pallas_values_and_grads(lhs, rhs, dout, gs, tiles)
    np.testing.assert_allclose(out, want, atol=TOL * np.sqrt(K))
    np.testing.assert_allclose(t_out, _np_tgmm(lhs, dout, sizes), atol=TOL * np.sqrt(M))
    np.testing.assert_allclose(d_lhs, _np_gmm(dout, np.swapaxes(np.asarray(rhs), 1, 2), sizes), atol=TOL * np.sqrt(N))
    np.testing.assert_allclose(d_rhs, _np_tgmm(lhs, dout, sizes), atol=TOL * np.sqrt(M))
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
    np.testing.assert_allclose(tgmm(lhs, dout, sizes, impl="tiled"), _np_tgmm(lhs, dout, np.asarray(sizes)), atol=1e-5)
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
    np.testing.assert_allclose(gmm(lhs, rhs, gs, **kw), _np_gmm(lhs, rhs, sizes), atol=1e-4)
    np.testing.assert_allclose(tgmm(lhs, dout, gs, **kw), _np_tgmm(lhs, dout, sizes), atol=1e-4)
