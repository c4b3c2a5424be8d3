"""Flash attention (Pallas, interpret mode on CPU) against its pure-JAX reference: values and gradients over
awkward shapes -- odd lengths, GQA ratios 1/4/8, many short documents per row, windows, soft-cap on/off."""

import dataclasses

import chex
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
    _check(T=37, block_q=16, block_k=32, dtype=jnp.bfloat16, softcap=20.0, docs=2)


@pytest.mark.parametrize("H", [64, 128, 256])
def test_head_dims(H):
    _check(B=1, T=24, N=2, K=1, H=H, block_q=16, block_k=16)


def test_cross_attention_lengths():
    """T != S (e.g. queries against a longer context): no block skipping, masks by positions."""
    B, T, S, N, K, H = 1, 12, 30, 4, 2, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
    kw = dict(q_positions=jnp.arange(S - T, S)[None], kv_positions=jnp.arange(S)[None],
              q_segment_ids=jnp.ones((B, T), jnp.int32), kv_segment_ids=jnp.ones((B, S), jnp.int32))
    np.testing.assert_allclose(flash_attention(q, k, v, block_q=16, block_k=16, **kw),
                               attention_reference(q, k, v, **kw), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("T, window, softcap, ratio", [(129, None, None, 4), (200, 64, 30.0, 8), (96, 7, None, 1)])
def test_larger_sweep(T, window, softcap, ratio):
    _check(B=2, T=T, N=8, K=8 // ratio, H=64, docs=4, window=window, softcap=softcap, block_q=32, block_k=32)


def test_tpu_interpret_mode():
    """The same kernels under Pallas' TPU interpret mode (Mosaic memory semantics, on CPU)."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, pos, seg = _inputs(1, 32, 4, 2, 128, 2, jnp.float32)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, logit_softcap=10.0)
    run = lambda q, k, v: flash_attention(q, k, v, block_q=16, block_k=8, backend="tpu", interpret=pltpu.InterpretParams(), **kw)
    np.testing.assert_allclose(run(q, k, v), attention_reference(q, k, v, **kw), atol=2e-5)
    g = jax.grad(lambda *a: run(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    r = jax.grad(lambda *a: attention_reference(*a, **kw).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, r):
        np.testing.assert_allclose(a, b, atol=1e-4)


# ------------------------------------------------------------------------------------ in the model

from conftest import VARIANTS  # noqa: E402

from jaxllm.config import AttentionConfig  # noqa: E402
from jaxllm.language_model import LanguageModel  # noqa: E402
from jaxllm.models.attention import attend  # noqa: E402


def _packed_batch(T=37):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (2, T))
    seg = np.ones((2, T), np.int32)
    seg[0, 11:] = 2
    seg[0, 30:] = 3
    pos = np.concatenate([np.arange(11), np.arange(19), np.arange(T - 30)])[None].repeat(2, 0)
    pos[1] = np.arange(T)
    return {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "positions": pos, "segment_ids": seg}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_model_with_pallas_attention_equals_xla(name):
    cfg = VARIANTS[name]
    xla = LanguageModel(cfg)
    pallas = LanguageModel(dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="pallas")))
    params = xla.init(jax.random.key(0))
    batch = _packed_batch()
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    np.testing.assert_allclose(pallas.apply(params, *args), xla.apply(params, *args), atol=2e-5, rtol=0)
    g_pallas = jax.grad(lambda p: pallas.loss(p, batch)[0])(params)
    g_xla = jax.grad(lambda p: xla.loss(p, batch)[0])(params)
    chex.assert_trees_all_close(g_pallas, g_xla, atol=2e-6, rtol=1e-4)


def test_sharded_model_with_pallas_attention_equals_single_device():
    from jaxllm.config import load_config
    from jaxllm.language_model import build
    from jaxllm.sharding import make_mesh

    cfg = load_config(["tiny", "mesh/fsdp_tp"], ["model.attention.impl=pallas"])
    lm, ref = build(cfg), LanguageModel(dataclasses.replace(cfg.model, attention=AttentionConfig()))
    params = ref.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 320, (8, 40)), "targets": rng.integers(0, 320, (8, 40))}
    want_loss, want_grads = jax.value_and_grad(lambda p: ref.loss(p, batch)[0])(params)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, lm.param_shardings(mesh))
        loss, grads = jax.jit(jax.value_and_grad(lambda p: lm.loss(p, batch)[0]))(sharded)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(grads), want_grads, atol=2e-6, rtol=1e-4)


def test_impl_dispatch_on_cpu():
    q, k, v, pos, seg = _inputs(1, 8, 2, 1, 16, 1, jnp.float32)
    kw = dict(q_positions_BT=pos, kv_positions_BS=pos, q_segment_ids_BT=seg, kv_segment_ids_BS=seg)
    with pytest.raises(ValueError, match="attention.impl=cudnn needs a CUDA GPU"):
        attend(q, k, v, impl="cudnn", **kw)
