"""LoRA and its variants as param-tree transforms: inits keep the base model, merge == adapter forward,
unmerge, several adapters on one base, dropout, LoRA+, quantised frozen kernels (property-based)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.config import ConfigError, LoraConfig, TrainConfig
from jaxllm.language_model import LanguageModel
from jaxllm.peft import LoraAdapter, quantize
from jaxllm.peft.inits import INITS
from jaxllm.train.optimizer import make_optimizer

from conftest import tiny_model

TOL = 1e-5  # max abs logit difference, f32


@pytest.fixture(scope="module")
def model():
    lm = LanguageModel(tiny_model(tie_embeddings=False))
    # jitted once for the module: one compiled program per param-tree shape instead of op-by-op dispatch
    lm.apply, lm.loss = jax.jit(lm.apply), jax.jit(lm.loss)
    return lm, lm.init(jax.random.key(0)), np.random.default_rng(0).integers(0, 97, (2, 12))


def _moved(tree, seed=7, size=0.05):
    """Adapter weights as after training (B no longer zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + size * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


SLOW = pytest.mark.slow  # the cross-product's remaining cells run with `pytest -m slow`


# every init with plain LoRA; DoRA's magnitude with the default init (its other inits in the slow set)
@pytest.mark.parametrize("init, dora", [(i, False) for i in sorted(INITS)]
                         + [("lora", True)] + [pytest.param(i, True, marks=SLOW) for i in sorted(INITS) if i != "lora"],
                         ids=lambda x: ("dora" if x else "lora") if isinstance(x, bool) else x)
def test_every_init_starts_at_the_base_model(model, init, dora):
    lm, params, tokens = model
    adapter = LoraAdapter(lm, LoraConfig(rank=4, init=init, dora=dora, targets=[".*"]))  # lm_head too
    lora, frozen = adapter.init(jax.random.key(1), params)
    out = lm.apply(adapter.apply(frozen, lora), tokens)
    np.testing.assert_allclose(out, lm.apply(params, tokens), atol=TOL, rtol=0)


# every variant unquantised, LoRA and DoRA on every quantised base; the other quantised cells in the slow set
@pytest.mark.parametrize("variant, quant", [
    (v, q) if q == "none" or v in ("lora", "dora") else pytest.param(v, q, marks=SLOW)
    for v in ["lora", "rslora", "pissa", "dora", "olora"] for q in ["none", "int8", "nf4"]])
def test_merge_then_forward_equals_adapter_forward(model, variant, quant):
    lm, params, tokens = model
    kw = {"rslora": dict(rslora=True), "pissa": dict(init="pissa"), "dora": dict(dora=True),
          "olora": dict(init="olora")}.get(variant, {})
    adapter = LoraAdapter(lm, LoraConfig(rank=4, alpha=8.0, quantize=quant, **kw))
    lora, frozen = adapter.init(jax.random.key(1), params)
    lora = _moved(lora)
    adapted = lm.apply(adapter.apply(frozen, lora), tokens)
    merged = adapter.merge(frozen, lora)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(merged))  # plain dense
    np.testing.assert_allclose(lm.apply(merged, tokens), adapted, atol=TOL, rtol=0)
    assert np.abs(adapted - lm.apply(params, tokens)).max() > 1e-2  # the adapter changes the model


def test_unmerge_restores_the_base(model):
    lm, params, tokens = model
    adapter = LoraAdapter(lm, LoraConfig(rank=4))
    lora, frozen = adapter.init(jax.random.key(1), params)
    lora = _moved(lora)
    snapshot = jax.tree.map(np.array, params)
    merged = adapter.merge(frozen, lora)
    chex.assert_trees_all_equal(params, snapshot)  # merging is pure: the base is untouched, bitwise
    restored = adapter.unmerge(merged, lora)
    # merged - s A B rounds like any float subtraction: within 1e-6 of the base (|W| ~ 0.02-0.1)
    chex.assert_trees_all_close(restored, params, atol=1e-6, rtol=0)
    untouched = ("embed", "final_norm", "lm_head")
    for key in untouched:
        chex.assert_trees_all_equal(restored[key], params[key])
    # with merge's record (integer ulp distances) the base comes back bitwise, every element
    merged, record = adapter.merge_reversibly(params, lora)
    chex.assert_trees_all_equal(merged, adapter.merge(params, lora))
    chex.assert_trees_all_equal(adapter.unmerge(merged, lora, record), params)
    assert any(bool(jnp.any(r != 0)) for r in jax.tree.leaves(record))  # plain subtraction alone is not bitwise
    dora = LoraAdapter(lm, LoraConfig(rank=4, dora=True))
    d_lora, d_frozen = dora.init(jax.random.key(1), params)
    with pytest.raises(ValueError, match="cannot be unmerged"):
        dora.unmerge(dora.merge(d_frozen, d_lora), d_lora)


def test_several_adapters_on_one_base(model):
    lm, params, tokens = model
    adapter = LoraAdapter(lm, LoraConfig(rank=2, targets=["q", "v"]))
    adapters = {name: _moved(adapter.init(jax.random.key(i), params)[0], seed=i) for i, name in enumerate(["a", "b"])}
    apply = jax.jit(lambda which: lm.apply(adapter.apply(params, which), tokens))
    outs = {name: apply(tree) for name, tree in adapters.items()}  # one compiled function, adapter per call
    assert np.abs(outs["a"] - outs["b"]).max() > 1e-2
    for name, tree in adapters.items():
        np.testing.assert_allclose(lm.apply(adapter.merge(params, tree), tokens), outs[name], atol=TOL, rtol=0)


def test_dropout_only_with_a_key(model):
    lm, params, tokens = model
    adapter = LoraAdapter(lm, LoraConfig(rank=4, dropout=0.5))
    lora, frozen = adapter.init(jax.random.key(1), params)
    lora = _moved(lora)
    run = lambda rng: lm.apply(adapter.apply(frozen, lora, rng), tokens)
    no_drop = run(None)
    np.testing.assert_allclose(no_drop, lm.apply(adapter.merge(frozen, lora), tokens), atol=TOL)
    k1, k2 = run(jax.random.key(3)), run(jax.random.key(4))
    assert np.abs(k1 - no_drop).max() > 1e-3 and np.abs(k1 - k2).max() > 1e-3
    np.testing.assert_array_equal(k1, run(jax.random.key(3)))  # deterministic given the key


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradients_reach_the_adapter_as_through_merged_weights(model, dora):
    lm, params, tokens = model
    adapter = LoraAdapter(lm, LoraConfig(rank=4, dora=dora))
    lora, frozen = adapter.init(jax.random.key(1), params)
    lora = _moved(lora)
    batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, axis=1))}
    grads = jax.grad(lambda a: lm.loss(adapter.apply(frozen, a), batch)[0])(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if not dora:  # W + sAB formed explicitly has the same gradient (DoRA's merge does not detach its norm)
        merged = jax.grad(lambda a: lm.loss(adapter.merge(frozen, a), batch)[0])(lora)
        chex.assert_trees_all_close(grads, merged, atol=1e-6, rtol=1e-4)


def test_lora_plus_gives_b_its_own_learning_rate(model):
    lm, params, tokens = model
    adapter = LoraAdapter(lm, LoraConfig(rank=4))
    lora = _moved(adapter.init(jax.random.key(1), params)[0])
    grads = jax.tree.map(lambda x: jnp.ones_like(x), lora)
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, schedule="constant")
    tx = make_optimizer(cfg, b_lr_ratio=16.0)
    updates, _ = tx.update(grads, tx.init(lora), lora)
    up = updates["blocks"]["mlp"]["up"]
    np.testing.assert_allclose(np.abs(up["a"]), 1e-3, rtol=1e-3)  # Adam's first step: lr * sign(g)
    np.testing.assert_allclose(np.abs(up["b"]), 16e-3, rtol=1e-3)


def test_target_and_rank_errors(model):
    lm, _, _ = model
    with pytest.raises(ConfigError, match=r"match no linear layer; names: \[.*'q'.*\]"):
        LoraAdapter(lm, LoraConfig(targets=["query"]))
    with pytest.raises(ConfigError, match="rank=64 exceeds the smaller side of blocks.attn.k"):
        LoraAdapter(lm, LoraConfig(rank=64, targets=["k"]))
    adapter = LoraAdapter(lm, LoraConfig(targets=["blocks\\.attn\\..*", "down"]))  # regexes over dotted paths
    assert [t.name for t in adapter.targets] == ["blocks.attn.k", "blocks.attn.o", "blocks.attn.q", "blocks.attn.v",
                                                 "blocks.mlp.down"]
    assert adapter.num_params == sum(x.size for x in jax.tree.leaves(adapter.param_shapes))


# QLoRA's NF4 code book as bitsandbytes publishes it (4 digits), independent of the module's table.
NF4_BOOK = np.array([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
                     0.4407, 0.5626, 0.7230, 1.0])


@settings(max_examples=5, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2), last=st.sampled_from([2, 6, 16, 48, 64, 96]),
       block=st.sampled_from([8, 32, 64]), kind=st.sampled_from(["int8", "nf4"]), seed=st.integers(0, 2**16))
def test_quantized_kernels_round_trip_within_their_bound(lead, last, block, kind, seed):
    """Blockwise absmax formats: each value's error is its distance to the nearest code point times the block's
    absmax, at most half the widest gap between code points (int8: 1/254; NF4: (1 - 0.6962) / 2)."""
    w = jax.random.normal(jax.random.key(seed), (*lead, last)) * 0.05
    q = quantize(w, kind, block)
    assert q.shape == w.shape and q.codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    b = max(d for d in range(1, min(block, last) + 1) if last % d == 0 and (kind == "int8" or d % 2 == 0))
    blocks = np.asarray(w, np.float64).reshape(*lead, last // b, b)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(q.scales)[..., None], absmax, rtol=1e-6)
    book = np.arange(-127, 128) / 127 if kind == "int8" else NF4_BOOK
    nearest = np.abs((blocks / absmax)[..., None] - book).min(-1)
    err = np.abs(np.asarray(q.dequantize(), np.float64).reshape(blocks.shape) - blocks)
    assert (err <= nearest * absmax + 1e-4 * absmax).all()  # the nearest code (book given to 4 digits)
    assert (nearest <= (1 / 254 if kind == "int8" else (1 - 0.6962) / 2) + 1e-9).all()
    n_in = int(np.prod(lead)) if lead else 1
    x = jax.random.normal(jax.random.key(seed + 1), (3, n_in))
    np.testing.assert_allclose(q.matmul(x, jnp.float32), x @ q.dequantize().reshape(n_in, -1), rtol=1e-5, atol=1e-6)


_OLORA_PROGRAM = """
import jax
from jaxllm.config import AttentionConfig, LoraConfig, MlpConfig, ModelConfig
from jaxllm.language_model import LanguageModel
from jaxllm.peft import LoraAdapter
lm = LanguageModel(ModelConfig(vocab_size=97, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=32,
                               mlp=MlpConfig(d_ff=128)))
adapter = LoraAdapter(lm, LoraConfig(rank=4, init="olora", targets=["q", "k", "v", "o", "gate", "up", "down"]))
lora, frozen = jax.jit(adapter.init)(jax.random.key(0), lm.init(jax.random.key(1)))
print("done", float(jax.tree.leaves(lora)[0].sum()))
"""


def test_olora_init_of_every_map_in_one_program_finishes():
    """Seven QRs of stacked layers in one jitted init: batched, jaxlib's QR deadlocked XLA's CPU thread pool on a
    2-core machine (the hang found by the PEFT experiment). Its own process, with a time limit."""
    import os
    import subprocess
    import sys

    from conftest import FAST_COMPILE

    done = subprocess.run([sys.executable, "-c", _OLORA_PROGRAM], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XLA_FLAGS": FAST_COMPILE})
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
