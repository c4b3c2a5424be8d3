"""Context-parallel attention (ring and all-gather over a `sequence` mesh axis of 2, 4 and 8 fake CPU devices)
equals single-device attention written here as a naive masked softmax: causal and not, GQA, packed rows, sliding
windows, soft-capped logits, contiguous and zigzag layouts, local queries in one block and in tiles; outputs and
gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import context_parallel
from jaxllm.models.context_parallel import context_parallel_attention, zigzag_order

B, T, N, K, H = 2, 32, 4, 2, 8


def reference(q, k, v, pos, seg, *, causal, window, softcap=None):
    """Naive attention over the whole sequence (jnp, so it differentiates): f32 softmax of masked scores."""
    s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2)) / np.sqrt(H)
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    allowed = seg[:, :, None] == seg[:, None, :]
    delta = pos[:, :, None] - pos[:, None, :]
    if causal:
        allowed &= delta >= 0
    if window:
        allowed &= jnp.abs(delta) < window
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), jnp.repeat(v, N // K, axis=2))


def inputs():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, T, n, H)).astype(np.float32) for n in (N, K, K))
    seg = np.ones((B, T), np.int32)
    seg[0, 11:] = 2  # row 0 packs three documents, row 1 one
    seg[0, 25:] = 3
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(seg[b]):
            pos[b, seg[b] == s] = np.arange((seg[b] == s).sum())
    return q, k, v, pos, seg


@pytest.mark.parametrize("devices", [2, pytest.param(4, marks=pytest.mark.slow), 8])  # 2: tiled queries; 8: most hops
@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_context_parallel_attention_equals_single_device(devices, method, monkeypatch):
    if devices == 2:  # 16 local positions in query tiles of 4: the tiled blocks
        monkeypatch.setattr(context_parallel, "QUERY_TILE", 4)
    mesh = jax.make_mesh((devices,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices])
    q, k, v, pos, seg = inputs()
    cases = [dict(causal=True, window=6, zigzag=True), dict(causal=False, window=None, zigzag=False)]
    if devices == 4:  # the other two combinations once
        cases += [dict(causal=True, window=None, zigzag=False, softcap=2.0), dict(causal=False, window=5, zigzag=True)]
    with jax.set_mesh(mesh):
        for case in cases:
            order = zigzag_order(T, devices) if case["zigzag"] else np.arange(T)
            inverse = np.argsort(order)
            kw = dict(causal=case["causal"], window=case["window"], softcap=case.get("softcap"))
            attend = lambda q, k, v: context_parallel_attention(
                q[:, order], k[:, order], v[:, order], pos[:, order], seg[:, order], method=method,
                causal=kw["causal"], sliding_window=kw["window"], logit_softcap=kw["softcap"])[:, inverse]
            want, w, ref = expected(kw["causal"], kw["window"], kw["softcap"])
            weighted = lambda q, k, v: (lambda out: (jnp.sum(out * w), out))(attend(q, k, v))
            (_, out), got = jax.jit(jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True))(q, k, v)
            np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5, err_msg=str(case))
            for g, r, name in zip(got, ref, "qkv"):
                np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=f"d{name} {case}")


@functools.lru_cache
def expected(causal, window, softcap):
    """The reference's output, a fixed random cotangent w and the gradients of sum(output * w) in q, k, v."""
    q, k, v, pos, seg = inputs()
    kw = dict(causal=causal, window=window, softcap=softcap)
    want = reference(q, k, v, pos, seg, **kw)
    w = np.random.default_rng(1).normal(size=want.shape).astype(np.float32)
    grads = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, pos, seg, **kw) * w), argnums=(0, 1, 2))(q, k, v)
    return np.asarray(want), w, [np.asarray(g) for g in grads]


def test_zigzag_balances_causal_work_and_is_a_permutation():
    order = zigzag_order(32, 4)
    assert sorted(order) == list(range(32))
    pieces = order.reshape(4, 8)  # what each of 4 devices holds
    assert pieces[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31] and pieces[3].tolist() == list(range(12, 20))
    work = [(p[:, None] >= np.arange(32)[None]).sum() for p in pieces]  # causal (query, key) pairs per device
    assert max(work) == min(work)
    with pytest.raises(ValueError, match="multiple of 2 x 4"):
        zigzag_order(36, 4)
