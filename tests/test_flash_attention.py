"""Flash attention (Pallas, interpret mode on CPU) against its pure-JAX reference: values and gradients over
awkward shapes -- odd lengths, GQA ratios 1/4/8, many short documents per row, windows, soft-cap on/off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.flash_attention import attention_reference, flash_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # max abs difference of outputs and of gradients


def _inputs(B, T, N, K, H, docs, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), dtype) for n in (N, K, K))
    # `docs` documents per row at random boundaries: segment ids 1.., positions restarting at each
    seg = np.ones((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=docs - 1, replace=False)) if docs > 1 else []
        for c in cuts:
            seg[b, c:] += 1
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def _check(B=2, T=40, N=4, K=2, H=32, docs=1, causal=True, window=None, softcap=None, dtype=jnp.float32,
           block_q=16, block_k=16):
    q, k, v, pos, seg = _inputs(B, T, N, K, H, docs, dtype)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
              sliding_window=window, logit_softcap=softcap)
    dout = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, N, H)), dtype)

    def loss(fn):
        return lambda q, k, v: jnp.sum((fn(q, k, v, **kw).astype(jnp.float32)) * dout.astype(jnp.float32))

    flash = lambda q, k, v, **kw: flash_attention(q, k, v, block_q=block_q, block_k=block_k, **kw)
    out = flash(q, k, v, **kw)
    ref = attention_reference(q, k, v, **kw)
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=0)
    grads = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        scale = max(1.0, float(jnp.abs(r.astype(jnp.float32)).max()))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * scale, rtol=0,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gqa_ratios(ratio):
    _check(N=8, K=8 // ratio)


@pytest.mark.parametrize("T", [1, 7, 33, 50])
def test_lengths_that_are_not_block_multiples(T):
    _check(T=T)


def test_many_short_documents_per_row():
    _check(T=48, docs=9)


@pytest.mark.parametrize("window", [1, 5, 17])
def test_sliding_windows(window):
    _check(T=45, docs=3, window=window)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("causal", [True, False])
def test_causal_and_softcap(causal, softcap):
    _check(causal=causal, softcap=softcap, docs=2)


def test_uneven_blocks_and_bf16():
    _check(T=37, block_q=8, block_k=16, dtype=jnp.bfloat16, softcap=20.0, docs=2)


@pytest.mark.parametrize("H", [64, 128, 256])
def test_head_dims(H):
    _check(B=1, T=24, N=2, K=1, H=H, block_q=8, block_k=8)


def test_cross_attention_lengths():
    """T != S (e.g. queries against a longer context): no block skipping, masks by positions."""
    B, T, S, N, K, H = 1, 12, 30, 4, 2, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
    kw = dict(q_positions=jnp.arange(S - T, S)[None], kv_positions=jnp.arange(S)[None],
              q_segment_ids=jnp.ones((B, T), jnp.int32), kv_segment_ids=jnp.ones((B, S), jnp.int32))
    np.testing.assert_allclose(flash_attention(q, k, v, block_q=8, block_k=8, **kw),
                               attention_reference(q, k, v, **kw), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("T, window, softcap, ratio", [(129, None, None, 4), (200, 64, 30.0, 8), (96, 7, None, 1)])
def test_larger_sweep(T, window, softcap, ratio):
    _check(B=2, T=T, N=8, K=8 // ratio, H=64, docs=4, window=window, softcap=softcap, block_q=32, block_k=32)
