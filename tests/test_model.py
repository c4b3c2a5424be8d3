"""Model behaviour: causality, packing, sliding window, layer scan, remat, dtypes, tied heads."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model

from jaxllm.config import AttentionConfig
from jaxllm.language_model import LanguageModel

TOL = dict(atol=2e-5, rtol=2e-5)  # f32 on CPU; results differ only by summation order


def _model_and_params(cfg, seed=0):
    lm = LanguageModel(cfg)
    params = lm.init(jax.random.key(seed))
    # Random (non-zero) norm scales and biases, so every parameter influences the checks below.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    perturbed = [
        x + 0.1 * jax.random.normal(k, x.shape) if path[-1].key in ("scale", "bias") else x
        for (path, x), k in zip(leaves, keys)
    ]
    return lm, jax.tree_util.tree_unflatten(treedef, perturbed)


def test_causality(variant):
    """Changing token t never changes logits before t, and does change logits at t."""
    lm, params = _model_and_params(variant)
    apply = jax.jit(lm.apply)
    T = 16
    tokens = jax.random.randint(jax.random.key(2), (2, T), 0, variant.vocab_size)
    base = apply(params, tokens)
    for t in (0, 5, T - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % variant.vocab_size)
        out = apply(params, changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], **TOL)
        assert float(jnp.max(jnp.abs(out[:, t] - base[:, t]))) > 1e-3


def test_packing_equals_separate_documents(variant):
    """Two documents packed in one row (segment ids, positions restarting) == each run alone."""
    lm, params = _model_and_params(variant)
    apply = jax.jit(lm.apply)
    la, lb = 7, 9
    doc_a = jax.random.randint(jax.random.key(3), (1, la), 0, variant.vocab_size)
    doc_b = jax.random.randint(jax.random.key(4), (1, lb), 0, variant.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(la), jnp.arange(lb)])[None]
    segments = jnp.concatenate([jnp.full(la, 1), jnp.full(lb, 2)])[None]
    out = apply(params, packed, positions, segments)
    np.testing.assert_allclose(out[:, :la], apply(params, doc_a), **TOL)
    np.testing.assert_allclose(out[:, la:], apply(params, doc_b), **TOL)
    # Without segment ids the second document does see the first: the check above is not vacuous.
    leaky = apply(params, packed, positions)
    assert float(jnp.max(jnp.abs(leaky[:, la:] - out[:, la:]))) > 1e-3


def test_sliding_window_limits_the_receptive_field():
    """With window W and one layer, logits at t depend on tokens t-W+1..t only."""
    W, T = 4, 12
    cfg = tiny_model(num_layers=1, attention=AttentionConfig(sliding_window=W))
    lm, params = _model_and_params(cfg)
    apply = jax.jit(lm.apply)
    tokens = jax.random.randint(jax.random.key(5), (1, T), 0, cfg.vocab_size)
    base = apply(params, tokens)
    changed = apply(params, tokens.at[:, 3].add(1))
    np.testing.assert_allclose(changed[:, 3 + W :], base[:, 3 + W :], **TOL)  # out of window
    assert float(jnp.max(jnp.abs(changed[:, 3 + W - 1] - base[:, 3 + W - 1]))) > 1e-4  # last in window


def _naive_attention(q, k, v, mask, scale, softcap=None):
    """Per-head numpy loop with kv heads repeated: an independent reference for `attend_xla`."""
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n // (N // K)].T * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n // (N // K)]
    return out


@pytest.mark.parametrize("N,K,window,softcap", [(4, 4, None, None), (4, 2, 3, None), (6, 1, None, 5.0)])
def test_attention_matches_naive_reference(N, K, window, softcap):
    from jaxllm.models.attention import attend

    B, T, H = 2, 10, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, n, H)).astype(np.float32) for n in (N, K, K))
    pos = np.tile(np.arange(T), (B, 1))
    seg = np.tile(np.repeat([1, 2], [4, T - 4]), (B, 1))
    pos = np.where(seg == 2, pos - 4, pos)
    out = attend(q, k, v, q_positions_BT=pos, kv_positions_BS=pos, q_segment_ids_BT=seg, kv_segment_ids_BS=seg,
                 sliding_window=window, logit_softcap=softcap)
    mask = (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
    if window:
        mask &= pos[:, :, None] - pos[:, None, :] < window
    np.testing.assert_allclose(out, _naive_attention(q, k, v, mask, H**-0.5, softcap), atol=1e-5, rtol=1e-5)


def test_scan_unrolled_and_remat_agree():
    cfg = tiny_model()
    lm, params = _model_and_params(cfg)
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, cfg.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    grad = lambda m: jax.jit(jax.grad(lambda p: m.loss(p, batch)[0]))(params)
    ref = grad(lm)
    for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots_no_batch")):
        other = LanguageModel(dataclasses.replace(cfg, **variant))
        chex.assert_trees_all_close(grad(other), ref, atol=1e-6, rtol=1e-5)


def test_bf16_compute_keeps_f32_params():
    cfg = tiny_model(dtype="bfloat16")
    lm, params = _model_and_params(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, cfg.vocab_size)
    scaled = {**params, "lm_head": jax.tree.map(lambda w: 30 * w, params["lm_head"])}  # logits of std ~3, as trained
    out16 = jax.jit(lm.apply)(scaled, tokens)
    assert out16.dtype == jnp.bfloat16
    out32 = jax.jit(LanguageModel(tiny_model()).apply)(scaled, tokens)
    assert float(jnp.std(out32)) > 2
    # bf16 keeps 8 significant bits (2^-9 relative rounding): through two blocks the logits stay within 2^-6
    # relative of f32, and differ by more than f32 rounding would (the compute really is bf16)
    rel = float(jnp.linalg.norm(out16.astype(jnp.float32) - out32) / jnp.linalg.norm(out32))
    assert 2**-12 < rel < 2**-6, rel
    batch = {"inputs": tokens, "targets": tokens}
    grads = jax.eval_shape(jax.grad(lambda p: lm.loss(p, batch)[0]), params)  # dtypes: no need to run it
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_tied_embeddings_and_hidden_states():
    cfg = tiny_model(tie_embeddings=True)
    lm, params = _model_and_params(cfg)
    assert "lm_head" not in params
    tokens = jax.random.randint(jax.random.key(8), (2, 5), 0, cfg.vocab_size)
    logits, hidden = lm.apply(params, tokens, return_hidden=True)
    chex.assert_shape(hidden, (2, 5, cfg.d_model))
    np.testing.assert_allclose(logits, hidden @ params["embed"]["embedding"].T, atol=1e-5)
    assert "lm_head" in LanguageModel(tiny_model()).param_shapes


def test_loss_mask_and_z_loss():
    from jaxllm.losses import cross_entropy

    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    targets = jnp.array([[0, 1]])
    loss, m = cross_entropy(logits, targets, jnp.array([[1, 0]]))
    np.testing.assert_allclose(loss, -np.log(0.5), rtol=1e-6)
    assert float(m["tokens"]) == 1.0
    loss_z, m = cross_entropy(logits + 1.0, targets, None, z_loss=0.1)  # logsumexp = 1 per token
    np.testing.assert_allclose(m["z_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(loss_z, (-np.log(0.5) - np.log(0.8)) / 2 + 0.1, rtol=1e-6)


def test_functional_api_composes_with_vmap():
    cfg = tiny_model()
    lm, params = _model_and_params(cfg)
    tokens = jax.random.randint(jax.random.key(9), (3, 2, 6), 0, cfg.vocab_size)
    out = jax.vmap(lm.apply, in_axes=(None, 0))(params, tokens)
    chex.assert_shape(out, (3, 2, 6, cfg.vocab_size))
    np.testing.assert_allclose(out[1], lm.apply(params, tokens[1]), **TOL)


@pytest.mark.parametrize("window", [None, 37])
def test_blocked_causal_attention_equals_one_tile(window):
    """Long self-attention skips key blocks after each query block (and before its window)."""
    from jaxllm.models.attention import _causal_blocks, attend, attend_xla, attention_mask

    B, T, N, K, H = 2, 300, 4, 2, 8
    assert len(_causal_blocks(T, T, True, window)) > 1
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, T, n, H)).astype(np.float32) for n in (N, K, K))
    seg = np.tile(np.repeat([1, 2, 3], [90, 150, 60]), (B, 1))
    pos = np.concatenate([np.arange(90), np.arange(150), np.arange(60)])[None].repeat(B, 0)
    out = attend(q, k, v, q_positions_BT=pos, kv_positions_BS=pos, q_segment_ids_BT=seg, kv_segment_ids_BS=seg,
                 sliding_window=window)
    mask = attention_mask(pos, pos, seg, seg, sliding_window=window)
    np.testing.assert_allclose(out, attend_xla(q, k, v, mask, scale=H**-0.5), atol=1e-5, rtol=1e-5)


def test_chunked_loss_equals_full_logits_loss():
    from jaxllm.losses import cross_entropy

    cfg = tiny_model(loss_chunk_tokens=10)  # 2 rows x 12 positions: chunks of 5, 5 and a padded 2 positions
    lm, params = _model_and_params(cfg)
    tokens = jax.random.randint(jax.random.key(10), (2, 12), 0, cfg.vocab_size)
    mask = (jax.random.uniform(jax.random.key(11), (2, 12)) < 0.7).astype(jnp.float32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": mask}

    def reference(p):
        return cross_entropy(lm.apply(p, tokens), batch["targets"], mask, z_loss=0.01)[0]

    chunked = lambda p: lm.loss(p, batch, z_loss=0.01)[0]
    np.testing.assert_allclose(chunked(params), reference(params), rtol=1e-6)
    chex.assert_trees_all_close(jax.grad(chunked)(params), jax.grad(reference)(params), atol=1e-6, rtol=1e-5)
    _, metrics = lm.loss(params, batch)
    assert float(metrics["tokens"]) == float(mask.sum())
