"""Read-ME: a dense model refactored into a pre-gated MoE (experts are slices of its FFNs, grouped by a stated rule
from activation statistics) and the pre-gating router (one choice per token for all layers, before the stack)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError, MoeConfig
from jaxllm.language_model import LanguageModel
from jaxllm.moe.refactor import ffn_activation_grams, partition_neurons, refactor_dense

from conftest import tiny_model

DENSE = tiny_model(num_layers=3, vocab_size=61)
ROWS = [np.random.default_rng(i).integers(0, 61, 24) for i in range(3)]


def _moe_cfg(top_k: int, experts: int = 4, shared: int = 16) -> tuple:
    return dataclasses.replace(DENSE, moe=MoeConfig(num_experts=experts, top_k=top_k, d_ff=(64 - shared) // experts,
                                                    shared_experts=1, shared_d_ff=shared, router="pregate",
                                                    router_state_dim=16))


@pytest.fixture(scope="module")
def dense():
    lm = LanguageModel(DENSE)
    return lm, lm.init(jax.random.key(0))


def test_grouping_rule_on_a_constructed_gram():
    """7 neurons, importance 9 > 8 > ... > 3: neuron 0 is shared; 1 seeds the first expert and takes 4 (correlation
    0.9), then 3 over 5 (both 0.5: the more important) and over 6 (0.1); 2 seeds the second, which takes the rest."""
    h = np.diag([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    corr = {(1, 4): 0.9, (1, 3): 0.5, (1, 5): 0.5, (1, 6): 0.1, (2, 3): 0.95}
    for (i, j), c in corr.items():
        h[i, j] = h[j, i] = c * np.sqrt(h[i, i] * h[j, j])
    p = partition_neurons(h, num_experts=2, shared=1)
    assert p.shared_S.tolist() == [0]
    assert p.experts_EN.tolist() == [[1, 3, 4], [2, 5, 6]]


def test_partition_is_a_partition_and_deterministic():
    a = np.random.default_rng(0).normal(size=(200, 48))
    h = a.T @ a
    p = partition_neurons(h, num_experts=4, shared=8)
    neurons = np.concatenate([p.shared_S, p.experts_EN.ravel()])
    assert sorted(neurons.tolist()) == list(range(48)) and p.experts_EN.shape == (4, 10)
    q = partition_neurons(h.copy(), num_experts=4, shared=8)
    assert all(np.array_equal(x, y) for x, y in zip(p, q))
    assert set(p.shared_S.tolist()) == set(np.argsort(-np.diag(h))[:8].tolist())


def test_activation_grams_equal_a_numpy_forward(dense):
    lm, params = dense
    grams = ffn_activation_grams(lm, params, ROWS[:2])
    # the FFN activations by hand: run the model's blocks (the calibration must see what `down` sees)
    hidden = []
    from flax import nnx

    model = nnx.merge(lm.graphdef, params)
    for row in ROWS[:2]:
        x = model.embed(jnp.asarray(row)[None])
        for layer in range(DENSE.num_layers):
            block = nnx.merge(*nnx.split(model.blocks))  # the stacked blocks; take layer `layer`
            one = jax.tree.map(lambda a: a[layer], nnx.state(block))
            b = nnx.merge(nnx.graphdef(block), one)
            x, _ = b.attend(x, jnp.arange(24)[None], jnp.ones((1, 24), jnp.int32), None, False)
            n = np.asarray(b.mlp_norm(x)[0], np.float64)
            g, u = np.asarray(b.mlp.gate.kernel[...], np.float64), np.asarray(b.mlp.up.kernel[...], np.float64)
            a = (n @ g) / (1 + np.exp(-(n @ g))) * (n @ u)
            hidden.append((layer, a))
            x = b.add(x, b.mlp(b.mlp_norm(x)))
    for layer in range(DENSE.num_layers):
        want = sum(a.T @ a for l_, a in hidden if l_ == layer)
        np.testing.assert_allclose(grams[layer], want, rtol=2e-4, atol=2e-4)


def test_refactored_model_with_every_expert_chosen_is_the_dense_model(dense):
    lm, params = dense
    moe_cfg = _moe_cfg(top_k=4)
    moe_params, partitions = refactor_dense(lm, params, moe_cfg, ROWS, jax.random.key(1))
    tokens = jnp.asarray(np.stack(ROWS))
    want = jax.jit(lm.apply)(params, tokens)
    got = jax.jit(LanguageModel(moe_cfg).apply)(moe_params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # with one expert per token it is a different, cheaper function
    one = jax.jit(LanguageModel(_moe_cfg(top_k=1)).apply)(moe_params, tokens)
    assert float(jnp.max(jnp.abs(one - want))) > 1e-3


def test_refactoring_checks_the_split_adds_up():
    bad = dataclasses.replace(_moe_cfg(top_k=1), moe=dataclasses.replace(_moe_cfg(top_k=1).moe, d_ff=16))
    with pytest.raises(ConfigError, match="must equal the dense FFN"):
        refactor_dense(LanguageModel(DENSE), None, bad, ROWS, jax.random.key(0))


@pytest.fixture(scope="module")
def pregated():
    cfg = _moe_cfg(top_k=1)
    lm = LanguageModel(cfg)
    return lm, lm.init(jax.random.key(3))


def test_pregate_routes_every_layer_alike_by_token_and_position_before_the_stack(pregated):
    lm, params = pregated
    from flax import nnx

    tokens = jnp.asarray(np.stack(ROWS))
    _, _, stats, _ = jax.jit(lambda p, t: nnx.merge(lm.graphdef, p).run(t))(params, tokens)
    r = {k: np.asarray(v, np.float64) for k, v in params["pregate"].items()}
    silu = lambda z: z / (1 + np.exp(-z))
    x = silu(r["token"][np.asarray(tokens)] + r["position"][np.arange(24)][None])
    logits = silu(x @ r["hidden"]) @ r["out"]  # [B, T, E]: the formula, by hand
    want = np.argmax(logits, -1).reshape(-1)
    for layer in range(DENSE.num_layers):
        np.testing.assert_array_equal(np.asarray(stats.expert_MP[layer, :, 0]), want)
    # training's variant runs every expert, the unchosen at weight 0: the same function
    every = dataclasses.replace(lm.cfg, moe=dataclasses.replace(lm.cfg.moe, router_grad="all"))
    np.testing.assert_allclose(jax.jit(LanguageModel(every).apply)(params, tokens), jax.jit(lm.apply)(params, tokens),
                               atol=1e-5, rtol=1e-5)


def test_pregated_cached_decoding_equals_the_full_forward(pregated):
    lm, params = pregated
    tokens = np.stack(ROWS)[:, :9].astype(np.int32)
    full = jax.jit(lm.apply)(params, jnp.asarray(tokens))
    apply_cached = jax.jit(lm.apply_cached)
    pos = np.broadcast_to(np.arange(9, dtype=np.int32), (3, 9))
    ones = np.ones((3, 9), np.int32)
    logits, cache = apply_cached(params, tokens[:, :5], pos[:, :5], ones[:, :5], lm.init_cache(3, 9))
    steps = [logits]
    for i in range(5, 9):
        step, cache = apply_cached(params, tokens[:, i:i + 1], pos[:, i:i + 1], ones[:, i:i + 1], cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_pregate_router_distils_from_the_dense_base_and_its_kl_falls(tmp_path):
    """`finetune.method=pregate` (the method `jaxllm finetune` runs), step by step on 8 devices: a random dense base
    whose FFNs matter refactored (shared 32 + 4 experts x 24 neurons, one expert per token), then only the pre-gating
    router trains, by distillation: its KL to the dense model on held-out batches falls below the refactored model's
    with the fresh router; the experts stay the base's slices."""
    from jaxllm.config import load_config
    from jaxllm.data.pipeline import load_corpus, make_batches
    from jaxllm.losses import distillation_sums
    from jaxllm.train.methods.base_model import Base
    from jaxllm.train.setup import setup_step

    from jaxllm.data.synthetic import generate_instructions

    data = tmp_path / "reverse.jsonl"  # instruction data as the fine-tuning tests use
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_instructions(64, seed=0)))
    dense_cfg = load_config(["tiny"], ["model.init_std=0.15"]).model
    dense = LanguageModel(dense_cfg).init(jax.random.key(5))
    cfg = load_config(["tiny"], [
        "model.init_std=0.15", "finetune.base=(in memory)", "finetune.method=pregate", f"data.source={data}",
        "data.format=sft", "data.seq_len=64", "train.batch_size=8", "train.learning_rate=3e-2", "train.warmup_steps=0",
        "train.steps=20", "finetune.calibration.samples=2", "model.moe.num_experts=4", "model.moe.top_k=1",
        "model.moe.d_ff=24", "model.moe.shared_experts=1", "model.moe.shared_d_ff=32", "model.moe.router=pregate",
        "model.moe.router_state_dim=32"])
    setup = setup_step(cfg, Base(dense_cfg, dense))
    state = setup.init()
    initial = jax.tree.map(jnp.copy, setup.method.to_model(state.params, setup.frozen, None))  # the step donates
    corpus = load_corpus(cfg.data)
    stream = iter(make_batches(corpus.train_docs, corpus.tokenizer, seq_len=64, batch_size=8, seed=0, repeat=True,
                               encode=corpus.encode))
    for step in range(20):
        state, _ = setup.train_step(state, setup.global_batch(next(stream)), setup.frozen_at(step))
    trained = setup.method.to_model(state.params, setup.frozen, None)
    np.testing.assert_array_equal(trained["blocks"]["mlp"]["down"], initial["blocks"]["mlp"]["down"])
    lm, teacher_lm = setup.lm, setup.method.teacher_lm
    batches = list(make_batches(corpus.eval_docs, corpus.tokenizer, seq_len=64, batch_size=8, seed=1, repeat=False,
                                encode=corpus.encode))[:3]
    kl = jax.jit(lambda p, d, b: distillation_sums(lm.apply(p, b["inputs"]), teacher_lm.apply(d, b["inputs"]),
                                                   b["loss_mask"])[1] / b["loss_mask"].sum())
    mean_kl = lambda p: np.mean([float(kl(p, dense, b)) for b in batches])
    before, after = mean_kl(initial), mean_kl(trained)
    assert after < 0.85 * before, (before, after)  # measured 0.68 -> 0.53; without the straight-through term 0.66
