"""Flash attention (Pallas, interpret mode on CPU) against attention written from its definition in this file
(`_definition`: its own visibility rule from positions and segment ids, independent of `kernels_pallas`): values
and gradients over awkward shapes -- odd lengths, GQA ratios 1/4/8, many short documents per row, windows,
soft-cap on/off. The module's own `attention_reference` is checked against the same definition."""

import dataclasses
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.flash_attention import attention_reference, flash_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # max abs difference of outputs and of gradients


def _definition(q_BTNH, k_BSKH, v_BSKH, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True,
                sliding_window=None, logit_softcap=None):
    """softmax(q.k / sqrt(H), capped as c * tanh(s / c)) over the keys query t may see, in f32: key s is visible
    iff it is in t's document (equal segment ids), not after t by position when causal, and |pos_t - pos_s| <
    window when windowed. Query head n reads key/value head n // (N // K). No masking constant: invisible keys
    get exactly zero weight."""
    B, T, N, H = q_BTNH.shape
    kv_head_N = jnp.arange(N) // (N // k_BSKH.shape[2])
    k_BSNH, v_BSNH = (x[:, :, kv_head_N].astype(jnp.float32) for x in (k_BSKH, v_BSKH))
    s_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(jnp.float32), k_BSNH) / np.sqrt(H)
    if logit_softcap is not None:
        s_BNTS = logit_softcap * jnp.tanh(s_BNTS / logit_softcap)
    q_pos, k_pos = q_positions[:, :, None], kv_positions[:, None, :]
    visible_BTS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        visible_BTS = visible_BTS & (k_pos <= q_pos)
    if sliding_window is not None:
        visible_BTS = visible_BTS & (jnp.abs(q_pos - k_pos) < sliding_window)
    e_BNTS = jnp.where(visible_BTS[:, None], jnp.exp(s_BNTS - s_BNTS.max(-1, keepdims=True)), 0.0)
    p_BNTS = e_BNTS / e_BNTS.sum(-1, keepdims=True)
    return jnp.einsum("bnts,bsnh->btnh", p_BNTS, v_BSNH).astype(q_BTNH.dtype)


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
    out = jax.jit(partial(flash, **kw))(q, k, v)
    ref = _definition(q, k, v, **kw)
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=0)
    grads = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(loss(_definition), argnums=(0, 1, 2)))(q, k, v)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        scale = max(1.0, float(jnp.abs(r.astype(jnp.float32)).max()))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * scale, rtol=0,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("ratio", [1, *(pytest.param(r, marks=pytest.mark.slow) for r in (4, 8))])  # test_larger_sweep: 4, 8
def test_gqa_ratios(ratio):
    _check(N=8, K=8 // ratio)


@pytest.mark.parametrize("T", [1, 7, *(pytest.param(t, marks=pytest.mark.slow) for t in (33, 50))])  # and 96, 129, 200 below
def test_lengths_that_are_not_block_multiples(T):
    _check(T=T)


def test_many_short_documents_per_row():
    _check(T=48, docs=9)


@pytest.mark.parametrize("window", [1, 5, pytest.param(17, marks=pytest.mark.slow)])  # larger_sweep: 7, 64
def test_sliding_windows(window):
    _check(T=45, docs=3, window=window)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("causal", [True, False])
def test_causal_and_softcap(causal, softcap):
    _check(causal=causal, softcap=softcap, docs=2)


def test_uneven_blocks_and_bf16():
    _check(T=37, block_q=16, block_k=32, dtype=jnp.bfloat16, softcap=20.0, docs=2)


@pytest.mark.parametrize("H", [64, 128, pytest.param(256, marks=pytest.mark.slow)])
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
                               _definition(q, k, v, **kw), atol=2e-5)


@pytest.mark.parametrize("causal, window, softcap", [(True, None, None), (False, 6, 7.0), (True, 3, None)])
def test_module_reference_is_the_definition(causal, window, softcap):
    """`attention_reference` (the pure-JAX reference shipped beside the kernel) against `_definition`."""
    q, k, v, pos, seg = _inputs(2, 29, 4, 2, 16, 3, jnp.float32)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
              sliding_window=window, logit_softcap=softcap)
    np.testing.assert_allclose(attention_reference(q, k, v, **kw), _definition(q, k, v, **kw), atol=2e-6)


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
    np.testing.assert_allclose(jax.jit(run)(q, k, v), _definition(q, k, v, **kw), atol=2e-5)
    g = jax.jit(jax.grad(lambda *a: run(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
    r = jax.jit(jax.grad(lambda *a: _definition(*a, **kw).sum(), argnums=(0, 1, 2)))(q, k, v)
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


# the model features around the kernel (grouped heads, window, softcap + qk-norm, learned positions + biases);
# head-group sizes 1..8 (MHA and MQA included) are swept against the naive reference by the kernel tests above
# (windows are swept by the kernel tests; the window and learned-position models run in the slow set)
@pytest.mark.parametrize("name", ["gqa", "qk_norm_softcap",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("sliding_window", "gpt2_style"))])
def test_model_with_pallas_attention_equals_xla(name):
    cfg = VARIANTS[name]
    xla = LanguageModel(cfg)
    pallas = LanguageModel(dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="pallas")))
    params = xla.init(jax.random.key(0))
    batch = _packed_batch()
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    np.testing.assert_allclose(jax.jit(pallas.apply)(params, *args), jax.jit(xla.apply)(params, *args), atol=2e-5,
                               rtol=0)
    g_pallas = jax.jit(jax.grad(lambda p: pallas.loss(p, batch)[0]))(params)
    g_xla = jax.jit(jax.grad(lambda p: xla.loss(p, batch)[0]))(params)
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


# ---------------------------------------------------------------------------- block classes, sweep

from kernels_pallas.flash_attention import FULL, PARTIAL, SKIP, Mask, block_classes  # noqa: E402


def _brute_force_classes(pos, seg, bq, bk, causal, window):
    """Each block pair's class from the materialised [T, S] mask, in numpy."""
    pos, seg = np.asarray(pos), np.asarray(seg)
    B, T = pos.shape
    out = np.zeros((B, T // bq, T // bk), np.int32)
    for b in range(B):
        visible = seg[b][:, None] == seg[b][None, :]
        if causal:
            visible &= pos[b][:, None] >= pos[b][None, :]
        if window is not None:
            visible &= np.abs(pos[b][:, None] - pos[b][None, :]) < window
        for i in range(T // bq):
            for j in range(T // bk):
                blk = visible[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                out[b, i, j] = FULL if blk.all() else SKIP if not blk.any() else PARTIAL
    return out


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 24), (False, 24)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_classes_against_a_brute_force_mask(causal, window, seed):
    """Random packed rows (1-12 documents): the classifier is sound everywhere (SKIP only where nothing is
    visible, FULL only where everything is), and exact for causal rows on and below the diagonal, the pairs
    the kernels visit there."""
    T, bq, bk = 128, 16, 32
    docs = np.random.default_rng(seed).integers(1, 13)
    _, _, _, pos, seg = _inputs(3, T, 1, 1, 8, int(docs), jnp.float32, seed=seed)
    got = np.asarray(block_classes(pos, pos, seg, seg, bq, bk, Mask(causal, window, None, 1.0)))
    want = _brute_force_classes(pos, seg, bq, bk, causal, window)
    assert ((got == SKIP) <= (want == SKIP)).all() and ((got == FULL) <= (want == FULL)).all()
    if causal and window is None:
        below = np.arange(T // bq)[:, None] * bq + bq > np.arange(T // bk)[None, :] * bk  # key block starts before the q block ends
        np.testing.assert_array_equal(got[:, below], want[:, below])
    assert (got == SKIP).any() or docs == 1 or not causal  # the classifier does skip work


SWEEP = [  # T, head_dim, G (q heads per kv head), causal, documents per row, window, soft-cap, dtype
    (128, 64, 1, True, 1, None, None, jnp.float32),
    (200, 128, 4, False, 9, None, 20.0, jnp.bfloat16),
    (384, 64, 8, True, 9, 48, None, jnp.float32),
    (200, 64, 8, True, 1, None, 20.0, jnp.bfloat16),
    (128, 128, 4, True, 9, 40, 30.0, jnp.float32),
    (384, 128, 1, False, 1, 64, None, jnp.bfloat16),
]


@pytest.mark.slow
@pytest.mark.parametrize("T,H,G,causal,docs,window,softcap,dtype", SWEEP, ids=[f"T{s[0]}-H{s[1]}-G{s[2]}" for s in SWEEP])
def test_default_tiles_sweep(T, H, G, causal, docs, window, softcap, dtype):
    """Values and gradients at the default (per-kernel, different) tiles: forward 128 x 64, backward 64 x 64
    or 32 x 32; every T, head_dim, GQA ratio, causal or not, 1 / 9 documents, window, soft-cap, f32 / bf16."""
    _check(B=1, T=T, N=G, K=1, H=H, docs=docs, causal=causal, window=window, softcap=softcap, dtype=dtype,
           block_q=None, block_k=None)


@pytest.mark.parametrize("backend,want", [
    ("triton", {"flash_attention_fwd": 2, "flash_attention_dkv": 5}),
    ("tpu", {"flash_attention_fwd": 2, "flash_attention_dq": 3, "flash_attention_dkv": 4}),
])
def test_backward_matmuls_per_block_pair(backend, want):
    """Matmuls per (query block, key block) pair, counted in the kernels' jaxprs: Triton's backward is one
    kernel of 5 (dq accumulated atomically across key blocks); TPU has no atomics, so 3 (dq) + 4 (dk/dv)."""
    q, k, v, pos, seg = _inputs(1, 32, 2, 1, 16, 1, jnp.float32)
    ids = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    fn = lambda q, k, v: flash_attention(q, k, v, block_q=16, block_k=16, backend=backend, **ids)
    jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](q))(q, k, v).jaxpr

    def dots(j):
        n = 0
        for e in j.eqns:
            n += e.primitive.name == "dot_general"
            for val in e.params.values():
                for sub in (val if isinstance(val, (tuple, list)) else (val,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns") and e.primitive.name != "cond":
                        n += dots(inner)
            if e.primitive.name == "cond":  # count the PARTIAL branch once (FULL is the same matmuls)
                n += max(dots(b.jaxpr) for b in e.params["branches"])
        return n

    def kernels(j):
        for e in j.eqns:
            if e.primitive.name == "pallas_call":
                yield str(e.params["name"]).split()[0], dots(e.params["jaxpr"])
            for val in e.params.values():
                inner = getattr(val, "jaxpr", val)
                if hasattr(inner, "eqns"):
                    yield from kernels(inner)

    counts = dict(kernels(jaxpr))
    assert counts == want, counts


def test_triton_kernels_read_the_model_layout_without_transposes():
    """On Triton no [B, T, heads, H] tensor is transposed around the kernels (forward or backward); the TPU
    style transposes q, k, v and the output to heads-major."""
    q, k, v, pos, seg = _inputs(1, 32, 4, 2, 16, 2, jnp.float32)
    ids = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

    def rank4_transposes(backend):
        fn = lambda q, k, v: flash_attention(q, k, v, block_q=16, block_k=16, backend=backend, **ids)
        jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](q))(q, k, v).jaxpr

        def count(j):
            n = 0
            for e in j.eqns:
                if e.primitive.name == "pallas_call":
                    continue
                n += e.primitive.name == "transpose" and e.invars[0].aval.ndim == 4
                for val in e.params.values():
                    inner = getattr(val, "jaxpr", val)
                    if hasattr(inner, "eqns"):
                        n += count(inner)
            return n
        return count(jaxpr)

    assert rank4_transposes("triton") == 0
    assert rank4_transposes("tpu") >= 4
