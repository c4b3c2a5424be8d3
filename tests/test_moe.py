"""The MoE FFN layer: capacity path (no overflow) == dropless path == a naive per-token loop, values and
gradients; zero-token experts; load-balancing loss by hand; null experts cost no FLOPs; drops reported."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ConfigError, MoeConfig, load_config
from jaxllm.models.moe import _DEFAULT_RULES, MoeFfn, load_balance_loss, route

from conftest import tiny_model


def _layer(**moe):
    cfg = tiny_model(moe=MoeConfig(num_experts=4, top_k=2, **moe))
    return MoeFfn(cfg, rngs=nnx.Rngs(0))


def _x(B=2, T=9, D=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def _naive(layer: MoeFfn, x_BTD):
    """Per token, per chosen expert: weight * SwiGLU_e(x), summed (null experts add nothing)."""
    x = np.asarray(x_BTD.reshape(-1, x_BTD.shape[-1]), np.float64)
    router = np.asarray(layer.router[...], np.float64)  # [D, experts + null slots]
    g, u, d = (np.asarray(w[...], np.float64) for w in (layer.gate, layer.up, layer.down))
    silu = lambda z: z / (1 + np.exp(-z))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ router
        p = np.exp(logits - logits.max())
        p /= p.sum()
        chosen = np.argsort(-p, kind="stable")[:layer.cfg.moe.top_k]  # ties: the lower slot first
        for e in chosen:
            if e < g.shape[0]:  # a null slot adds nothing but keeps its share of the renormalised weight
                out[n] += p[e] / p[chosen].sum() * ((silu(x[n] @ g[e]) * (x[n] @ u[e])) @ d[e])
    return out.reshape(x_BTD.shape)


@pytest.mark.parametrize("null", [0, 2])
def test_dropless_equals_a_naive_loop_including_zero_token_experts(null):
    layer = _layer(null_experts=null)
    layer.router.value = layer.router[...].at[:, 3].set(-10.0)  # with x > 0: expert 3 gets no token
    layer.router.value = layer.router[...].at[:, 2].set(layer.router[:, 1])  # experts 1 and 2 tie on every token
    x = jnp.abs(_x())
    y, stats, _ = layer(x)
    assert float(stats.expert_load[3]) == 0.0
    np.testing.assert_allclose(y, _naive(layer, x), atol=1e-5)


@pytest.mark.parametrize("null", [0, 2])
def test_capacity_path_without_overflow_equals_dropless(null):
    dropless, capacity = _layer(null_experts=null), _layer(null_experts=null, dispatch="capacity", capacity_factor=8.0)
    x = _x()
    (y1, _, _), (y2, s2, _) = dropless(x), capacity(x)
    np.testing.assert_allclose(y2, y1, atol=1e-5)
    assert float(s2.drop_fraction) == 0.0
    grads = []
    for layer in (dropless, capacity):
        graph, params = nnx.split(layer)
        grads.append(jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x)[0] ** 2), argnums=(0, 1))(params, x))
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5)


def test_small_capacity_drops_and_reports_it():
    layer = _layer(dispatch="capacity", capacity_factor=0.25)  # 18 tokens * 2 / 4 experts * 0.25 -> 3 slots each
    assert layer.capacity(18) == 3
    x = _x()
    _, stats, _ = layer(x)
    r = route(x.reshape(-1, 32), layer.router[...], 2)
    counts = np.bincount(np.asarray(r.expert_MP).reshape(-1), minlength=4)
    assert float(stats.drop_fraction) == pytest.approx(1 - np.minimum(counts, 3).sum() / 36)
    assert float(stats.drop_fraction) > 0
    # which choices were dropped, by the priority rule: all first choices in token order, then second choices
    e_MP, taken, dropped = np.asarray(r.expert_MP), np.zeros(4, int), np.zeros((18, 2), bool)
    for p in range(2):
        for m in range(18):
            dropped[m, p] = taken[e_MP[m, p]] >= 3
            taken[e_MP[m, p]] += 1
    np.testing.assert_array_equal(stats.expert_MP, e_MP)
    np.testing.assert_array_equal(stats.dropped_MP, dropped)


def test_pallas_grouped_matmul_path_equals_ragged_dot():
    x = _x()
    y_xla, _, _ = _layer(impl="xla")(x)
    y_pallas, _, _ = _layer(impl="pallas")(x)
    np.testing.assert_allclose(y_pallas, y_xla, atol=1e-5)


def test_load_balance_loss_by_hand():
    # 4 tokens, 2 slots, top-1: choices [0, 0, 0, 1] -> f = [0.75, 0.25]; mean probs P = [0.6, 0.4]
    probs = jnp.asarray([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    expert = jnp.asarray([[0], [0], [0], [1]])
    assert float(load_balance_loss(expert, probs)) == pytest.approx(2 * (0.75 * 0.6 + 0.25 * 0.4))
    uniform = jnp.full((4, 2), 0.5)
    assert float(load_balance_loss(jnp.asarray([[0], [1], [0], [1]]), uniform)) == pytest.approx(1.0)


def test_null_experts_cost_no_flops():
    x = _x()
    D, F = 32, 64
    plain_y, plain, _ = _layer()(x)
    assert float(plain.expert_flops) == 18 * 2 * (2 * 3 * D * F)  # every token: 2 real experts
    layer = _layer(null_experts=4)
    _, stats, _ = layer(x)
    r = route(x.reshape(-1, D), layer.router[...], 2)
    real = int(jnp.sum(r.expert_MP < 4))
    assert real < 36 and float(stats.expert_flops) == real * 2 * 3 * D * F  # counted: only real assignments
    assert float(stats.expert_load[4:].sum()) == pytest.approx(1 - real / 36)


def test_shared_experts_and_config_errors():
    layer = _layer(shared_experts=1)
    x = _x()
    y, _, _ = layer(x)
    routed_only = dataclasses.replace(layer.cfg.moe, shared_experts=0)
    other = MoeFfn(dataclasses.replace(layer.cfg, moe=routed_only), rngs=nnx.Rngs(0))
    for name in ("router", "gate", "up", "down"):
        getattr(other, name).value = getattr(layer, name)[...]
    np.testing.assert_allclose(y - other(x)[0], layer.shared(x), atol=1e-5)  # the always-on FFN adds on
    with pytest.raises(ConfigError, match="top_k=5 must be within"):
        load_config(["tiny"], ["model.moe.num_experts=4", "model.moe.top_k=5"])
    with pytest.raises(ConfigError, match="model.moe.dispatch='sinkhorn' is not allowed"):
        load_config(["tiny"], ["model.moe.dispatch=sinkhorn"])


# ----------------------------------------------------------------------------------------- in the model

from jaxllm.language_model import LanguageModel  # noqa: E402


def _moe_model(**moe):
    return LanguageModel(tiny_model(moe=MoeConfig(num_experts=4, top_k=2, **moe)))


def test_moe_model_trains_with_router_losses_and_metrics(tmp_path):
    import optax

    from jaxllm.train.step import init_state, make_train_step

    lm = _moe_model()
    tx = optax.sgd(0.1)
    state = init_state(lm, tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 97, (4, 16))), "targets": jnp.asarray(rng.integers(0, 97, (4, 16)))}
    _, metrics = jax.jit(make_train_step(lm, tx))(state, batch)
    ce, _, n, stats = lm.loss_terms(state.params, batch)
    aux = 0.01 * jnp.mean(stats.load_balance_loss) + 0.001 * jnp.mean(stats.router_z_loss)
    np.testing.assert_allclose(metrics["loss"], ce / n + aux, rtol=1e-5)  # the router losses are in the loss
    assert metrics["moe/expert_load"].shape == (2, 4)
    np.testing.assert_allclose(metrics["moe/expert_load"].sum(axis=1), 1.0, rtol=1e-5)
    assert 0 < float(metrics["moe/router_entropy"]) <= np.log(4) + 1e-6


@pytest.mark.parametrize("microbatches", [pytest.param(1, marks=pytest.mark.slow), 2])  # 2 includes 1's claim
def test_lm_loss_is_what_the_train_step_minimises(microbatches):
    """`jax.grad(lm.loss)` of an MoE model (router losses included) is the gradient the train step applies; with
    microbatches, the mean of it over the microbatches (the load-balancing loss is per microbatch, not additive)."""
    import optax

    from jaxllm.train.step import init_state, make_train_step

    lm = _moe_model()
    tx = optax.sgd(1.0)  # new params = params - gradient
    state = init_state(lm, tx, seed=0)
    rng = np.random.default_rng(1)
    batch = {"inputs": jnp.asarray(rng.integers(0, 97, (4, 16))), "targets": jnp.asarray(rng.integers(0, 97, (4, 16)))}
    new, metrics = jax.jit(make_train_step(lm, tx, microbatches=microbatches, z_loss=1e-3))(state, batch)
    step_grads = jax.tree.map(jnp.subtract, state.params, new.params)
    parts_of = [{k: v.reshape(microbatches, -1, v.shape[1])[i] for k, v in batch.items()}
                for i in range(microbatches)]
    loss_fn = jax.jit(lambda p, b: lm.loss(p, b, z_loss=1e-3))
    grad_fn = jax.jit(jax.grad(lambda p, b: lm.loss(p, b, z_loss=1e-3)[0]))
    loss = np.mean([loss_fn(state.params, b)[0] for b in parts_of])
    grads = jax.tree.map(lambda *g: sum(g) / microbatches, *[grad_fn(state.params, b) for b in parts_of])
    parts = loss_fn(state.params, parts_of[0])[1]  # compiled already
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    assert float(parts["aux_loss"]) > 0  # the router losses are part of it
    router = [k for k in grads["blocks"]["mlp"] if "router" in k]
    assert router and float(jnp.abs(grads["blocks"]["mlp"][router[0]]).max()) > 0  # router losses reach the router
    chex.assert_trees_all_close(grads, step_grads, atol=1e-6, rtol=1e-4)


def test_moe_model_capacity_equals_dropless_and_counts_active_flops():
    dropless, capacity = _moe_model(), _moe_model(dispatch="capacity", capacity_factor=8.0)
    params = dropless.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 97, (2, 12))), "targets": jnp.asarray(rng.integers(0, 97, (2, 12)))}
    losses = [jax.jit(jax.value_and_grad(lambda p, lm=lm: lm.loss(p, batch)[0]))(params) for lm in (dropless, capacity)]
    np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=1e-6)
    chex.assert_trees_all_close(losses[0][1], losses[1][1], atol=1e-6)
    dense = LanguageModel(tiny_model())
    D, F, L = 32, 64, 2
    # forward FLOPs: dense FFN (3 D F) -> 2 active experts (2 x 3 D F) + router (D x 4)
    extra = L * (3 * D * F + D * 4)
    assert dropless.flops_per_token(12) == pytest.approx(dense.flops_per_token(12) + 3 * 2 * extra)


# ------------------------------------------------------------------------------ expert parallelism

from jaxllm import build, make_mesh  # noqa: E402
from jaxllm.models.expert_parallel import expert_axes  # noqa: E402


@pytest.mark.parametrize("mesh_sizes", [pytest.param(dict(expert=4, data=2, fsdp=1, tensor=1), marks=pytest.mark.slow),
                                        dict(expert=2, data=1, fsdp=2, tensor=2)],
                         ids=["expert4_data2", "expert2_fsdp2_tensor2"])  # the second splits every other axis too
def test_expert_parallel_equals_single_device(mesh_sizes):
    """Experts split over `expert` (all-to-all inside shard_map) give the single-device loss and grads."""
    overrides = [f"mesh.{a}={n}" for a, n in mesh_sizes.items()]
    cfg = load_config(["tiny"], ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.null_experts=1",
                                 "model.moe.impl=xla"] + overrides)
    lm = build(cfg)
    params = lm.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 320, (8, 16)), "targets": rng.integers(0, 320, (8, 16))}
    loss_fn = lambda p: lm.loss(p, batch)[0]
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    mesh = make_mesh(cfg.mesh)
    shardings = lm.param_shardings(mesh)
    assert shardings["blocks"]["mlp"]["gate"].spec[1] == "expert"  # [layers, E, D, F]: experts split
    with jax.set_mesh(mesh):
        assert expert_axes(lm.rules, 8) == ("expert",)
        hlo = jax.jit(jax.value_and_grad(loss_fn)).lower(jax.device_put(params, shardings)).as_text()
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(jax.device_put(params, shardings))
    assert "all_to_all" in hlo or "all-to-all" in hlo  # tokens really are exchanged
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(grads), want_grads, atol=2e-6, rtol=1e-4)


def test_expert_axis_must_divide_the_experts():
    cfg = load_config(["tiny"], ["model.moe.num_experts=6", "mesh.expert=4", "mesh.data=2", "mesh.fsdp=1"])
    with pytest.raises(Exception, match="expert"):
        build(cfg).param_shardings(make_mesh(cfg.mesh))


# ------------------------------------------------------------------------------ sparse upcycling

@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    from jaxllm.train.trainer import train

    run = tmp_path_factory.mktemp("moe") / "dense"
    train(load_config(["tiny"], [f"checkpoint.run_dir={run}", "train.steps=3", "train.eval_every=0"]))
    return run


def test_upcycling_computes_the_dense_model_until_it_trains():
    """Every expert a copy of its layer's dense FFN, the router fresh: the upcycled model's logits are the dense
    model's (the top-k weights sum to 1 and all experts agree); a config that changes more than model.moe is refused."""
    from jaxllm.models.upcycle import upcycle

    dense = LanguageModel(tiny_model())
    moe_cfg = dataclasses.replace(dense.cfg, moe=MoeConfig(num_experts=4, top_k=2))
    dp = dense.init(jax.random.key(0))
    mp = jax.jit(lambda p, k: upcycle(p, dense.cfg, moe_cfg, k))(dp, jax.random.key(1))
    np.testing.assert_array_equal(mp["blocks"]["mlp"]["up"][:, 3], dp["blocks"]["mlp"]["up"]["kernel"])
    tokens = np.random.default_rng(0).integers(0, 97, (2, 16))
    np.testing.assert_allclose(jax.jit(LanguageModel(moe_cfg).apply)(mp, tokens), jax.jit(dense.apply)(dp, tokens),
                               atol=1e-5)
    with pytest.raises(ConfigError, match="only model.moe"):
        upcycle(dp, dense.cfg, dataclasses.replace(moe_cfg, num_layers=3), jax.random.key(0))


@pytest.mark.slow  # the same start through `jaxllm finetune` and 6 training steps; the test above has the exactness
def test_upcycled_model_starts_as_the_dense_one_and_trains(dense_run):
    """`jaxllm finetune --base DENSE_RUN model.moe.num_experts=4`: experts copied from the dense FFN, router
    fresh, so the upcycled model computes the dense logits; training then moves the experts apart."""
    from jaxllm.data.pipeline import load_corpus, make_batches
    from jaxllm.interop.models import load_model
    from jaxllm.train.setup import setup_step
    from jaxllm.train.trainer import resolve_finetune_config

    dense = load_model(dense_run)
    cfg = resolve_finetune_config(str(dense_run), [], [
        "finetune.method=full", "model.moe.num_experts=4", "model.moe.top_k=2", "train.batch_size=8",
        "train.steps=6", "train.warmup_steps=0", "train.learning_rate=0.003", "data.seq_len=32"])
    setup = setup_step(cfg)
    state = setup.init()
    mlp = state.params["blocks"]["mlp"]
    assert mlp["gate"].shape == (2, 4) + dense.params["blocks"]["mlp"]["gate"]["kernel"].shape[1:]
    np.testing.assert_array_equal(np.asarray(mlp["up"][:, 3]), np.asarray(dense.params["blocks"]["mlp"]["up"]["kernel"]))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
    np.testing.assert_allclose(jax.jit(setup.lm.apply)(state.params, tokens), jax.jit(dense.lm.apply)(dense.params, tokens),
                               atol=1e-5)
    corpus = load_corpus(cfg.data)
    batches = make_batches(corpus.train_docs, corpus.tokenizer, seq_len=32, batch_size=8, seed=0, repeat=True,
                           encode=corpus.encode)
    losses = []
    with jax.set_mesh(setup.mesh):
        for _, batch in zip(range(6), batches):
            state, metrics = setup.train_step(state, setup.global_batch(batch), setup.frozen)
            losses.append(float(metrics["loss"]))
    gate = np.asarray(state.params["blocks"]["mlp"]["gate"])
    assert np.abs(gate[:, 0] - gate[:, 1]).max() > 0  # the copies diverged
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="only model.moe"):
        from jaxllm.models.upcycle import upcycle

        upcycle(dense.params, dense.lm.cfg, dataclasses.replace(setup.lm.cfg, num_layers=3), jax.random.key(0))


# ------------------------------------------------------------------------------ routing variants

def test_expert_choice_equals_a_naive_per_expert_selection():
    """Each expert takes its `capacity` highest-probability tokens; outputs summed with those probs."""
    layer = _layer(routing="expert_choice", dispatch="capacity", capacity_factor=0.5)  # 18 tok * 2 / 4 * .5 -> 5
    x = _x()
    y, stats, _ = layer(x)
    xs = np.asarray(x.reshape(-1, 32), np.float64)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(xs, jnp.float32) @ layer.router[...], axis=-1), np.float64)
    g, u, d = (np.asarray(w[...], np.float64) for w in (layer.gate, layer.up, layer.down))
    silu = lambda z: z / (1 + np.exp(-z))
    C = layer.capacity(18)
    assert C == 5
    want, taken = np.zeros_like(xs), np.zeros(18, bool)
    for e in range(4):
        for n in np.argsort(-probs[:, e], kind="stable")[:C]:
            want[n] += probs[n, e] * ((silu(xs[n] @ g[e]) * (xs[n] @ u[e])) @ d[e])
            taken[n] = True
    np.testing.assert_allclose(y.reshape(-1, 32), want, atol=1e-5)
    np.testing.assert_allclose(stats.drop_fraction, 1 - taken.mean(), atol=1e-6)
    assert float(stats.expert_flops) == 4 * C * 2 * 3 * 32 * 64  # every expert runs exactly C tokens
    assert float(stats.load_balance_loss) == 0.0
    with pytest.raises(ConfigError, match="expert_choice"):
        load_config(["tiny"], ["model.moe.num_experts=4", "model.moe.routing=expert_choice"])  # needs capacity


def test_recurrent_router_is_a_gru_whose_state_crosses_layers():
    from jaxllm.models.recurrent_router import RecurrentRouter

    router = RecurrentRouter(32, 8, 5, 0.5, rngs=nnx.Rngs(0))
    router.bias.value = jax.random.normal(jax.random.key(3), (24,))
    x, h = np.asarray(_x(1, 6).reshape(6, 32), np.float64), np.asarray(jax.random.normal(jax.random.key(4), (6, 8)), np.float64)
    w_in, w_x, w_h, b, w_out = (np.asarray(p[...], np.float64) for p in (router.w_in, router.w_x, router.w_h, router.bias, router.w_out))
    sig = lambda z: 1 / (1 + np.exp(-z))
    gx, gh = (x @ w_in) @ w_x + b, h @ w_h
    z, r = sig(gx[:, :8] + gh[:, :8]), sig(gx[:, 8:16] + gh[:, 8:16])
    h_new = (1 - z) * np.tanh(gx[:, 16:] + r * gh[:, 16:]) + z * h
    logits, state = router(jnp.asarray(x, jnp.float32), jnp.asarray(h, jnp.float32))
    np.testing.assert_allclose(state, h_new, atol=1e-5)
    np.testing.assert_allclose(logits, h_new @ w_out, atol=1e-5)
    # in the model, layer 0 starts from zeros (its w_h gets no gradient); layer 1 gets layer 0's state
    lm = _moe_model(router="recurrent", router_state_dim=8)
    params = lm.init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)))
    grads = jax.jit(jax.grad(lambda p: lm.loss(p, {"inputs": tokens, "targets": tokens})[0]))(params)
    g_h = np.asarray(grads["blocks"]["mlp"]["router"]["w_h"])
    assert np.abs(g_h[0]).max() == 0.0 and np.abs(g_h[1]).max() > 0


# ------------------------------------------------------------------------------ MoE every N layers

def test_moe_every_other_layer_interleaves_dense_and_moe_blocks():
    """every=2 on 4 layers: dense, MoE, dense, MoE. With each MoE layer's experts all copies of a dense FFN,
    the model must compute that dense model's logits (so the layer order is right), with and without cache."""
    dense = LanguageModel(tiny_model(num_layers=4))
    lm = LanguageModel(tiny_model(num_layers=4, moe=MoeConfig(num_experts=4, top_k=2, every=2)))
    dp, mp = dense.init(jax.random.key(0)), lm.init(jax.random.key(1))
    assert jax.tree.leaves(mp["blocks"])[0].shape[0] == 2 and mp["moe_blocks"]["mlp"]["gate"].shape[:2] == (2, 4)
    pick = lambda tree, idx: jax.tree.map(lambda a: a[np.asarray(idx)], tree)
    moe_layers = pick({k: v for k, v in dp["blocks"].items() if k != "mlp"}, [1, 3])
    experts = {n: jnp.repeat(dp["blocks"]["mlp"][n]["kernel"][np.asarray([1, 3])][:, None], 4, axis=1) for n in ("gate", "up", "down")}
    params = {**dp, "blocks": pick(dp["blocks"], [0, 2]),
              "moe_blocks": {**moe_layers, "mlp": {**experts, "router": mp["moe_blocks"]["mlp"]["router"]}}}
    tokens = np.random.default_rng(0).integers(0, 97, (2, 10))
    full = jax.jit(dense.apply)(dp, tokens)
    np.testing.assert_allclose(jax.jit(lm.apply)(params, tokens), full, atol=1e-5)
    cache = lm.init_cache(2, 10)  # with a cache: 9 tokens of prefill, then the 10th
    pos, seg = jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), jnp.int32)
    cached = jax.jit(lm.apply_cached)
    _, cache = cached(params, tokens[:, :9], pos[:, :9], seg[:, :9], cache)
    np.testing.assert_allclose(cached(params, tokens[:, 9:], pos[:, 9:], seg[:, 9:], cache)[0][:, 0], full[:, 9],
                               atol=1e-5)
    _, _, _, stats = jax.jit(lm.loss_terms)(params, {"inputs": tokens, "targets": tokens})
    assert stats.expert_load.shape == (2, 4)  # one row per MoE layer
    every_layer = LanguageModel(tiny_model(num_layers=4, moe=MoeConfig(num_experts=4, top_k=2)))
    per_moe_layer = (every_layer.flops_per_token(10) - dense.flops_per_token(10)) / 4
    assert lm.flops_per_token(10) == pytest.approx(dense.flops_per_token(10) + 2 * per_moe_layer)
    with pytest.raises(ConfigError, match="must divide"):
        load_config(["tiny"], ["model.moe.num_experts=4", "model.moe.every=3"])


# ------------------------------------------------------------------------------ MixLoRA

def test_mixlora_layer_equals_a_naive_loop_and_starts_as_the_dense_model():
    from jaxllm.models.mixlora import MixLoraFfn
    from jaxllm.train.methods.added_modules import overlay

    cfg = tiny_model(moe=MoeConfig(num_experts=4, top_k=2, lora_rank=3, lora_alpha=6.0))
    layer = MixLoraFfn(cfg, _DEFAULT_RULES, rngs=nnx.Rngs(0))
    for name in ("gate_b", "up_b", "down_b"):  # non-zero deltas, so they are checked too
        getattr(layer, name).value = 0.3 * jax.random.normal(jax.random.key(len(name)), getattr(layer, name).shape)
    x = _x()
    y, stats, _ = layer(x)
    xs = np.asarray(x.reshape(-1, 32), np.float64)
    r = route(jnp.asarray(xs, jnp.float32), layer.router[...], 2)
    W = {n: np.asarray(getattr(layer, n).kernel[...], np.float64) for n in ("gate", "up", "down")}
    ab = {n: np.asarray(getattr(layer, n)[...], np.float64) for n in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")}
    silu = lambda z: z / (1 + np.exp(-z))
    want = np.zeros_like(xs)
    for n in range(xs.shape[0]):
        for e, w in zip(np.asarray(r.expert_MP[n]), np.asarray(r.weight_MP[n])):
            mat = {k: W[k] + 2.0 * ab[f"{k}_a"][e] @ ab[f"{k}_b"][e] for k in W}  # s = 6 / 3
            want[n] += w * ((silu(xs[n] @ mat["gate"]) * (xs[n] @ mat["up"])) @ mat["down"])
    np.testing.assert_allclose(y.reshape(-1, 32), want, atol=1e-5)
    assert float(stats.load_balance_loss) > 0
    # a fresh MixLoRA model on a dense base (B = 0) computes the dense model
    dense, mix = LanguageModel(tiny_model()), LanguageModel(cfg)
    dp = dense.init(jax.random.key(0))
    params = overlay(mix.init(jax.random.key(1)), dp)
    tokens = np.random.default_rng(0).integers(0, 97, (2, 10))
    np.testing.assert_allclose(mix.apply(params, tokens), dense.apply(dp, tokens), atol=1e-5)


def test_mixlora_trains_router_and_experts_only_with_the_balancing_loss():
    import optax

    from jaxllm.train.methods.added_modules import join, overlay, split_added
    from jaxllm.train.step import TrainState, make_train_step

    dense, mix = LanguageModel(tiny_model()), LanguageModel(tiny_model(moe=MoeConfig(num_experts=4, top_k=2, lora_rank=4)))
    base = dense.init(jax.random.key(0))
    trained, frozen = split_added(overlay(mix.init(jax.random.key(1)), base), base)
    n_trained = sum(x.size for x in jax.tree.leaves(trained))
    assert n_trained == 2 * (32 * 4 + 4 * 3 * 4 * (32 + 64))  # per layer: router + 3 pairs of A, B per expert
    tx = optax.adam(1e-2)
    state = TrainState(jnp.zeros((), jnp.int32), trained, tx.init(trained), jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(mix, tx, to_model=lambda t, f, _rng: join(t, f)))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 97, (4, 16))), "targets": jnp.asarray(rng.integers(0, 97, (4, 16)))}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    ce, _, n, stats = mix.loss_terms(join(state.params, frozen), batch)
    aux = 0.01 * jnp.mean(stats.load_balance_loss) + 0.001 * jnp.mean(stats.router_z_loss)
    assert float(aux) > 0
    _, metrics = step(jax.tree.map(jnp.copy, state), batch, frozen)
    np.testing.assert_allclose(metrics["loss"], ce / n + aux, rtol=1e-5)  # the balancing loss is in the loss
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, trained)
    assert min(jax.tree.leaves(moved)) > 0  # router and every LoRA factor trained
    frozen_leaves = [x for x in jax.tree.leaves(frozen)]
    assert sum(x.size for x in frozen_leaves) == dense.num_params  # the base is exactly the frozen part
    with pytest.raises(ConfigError, match="MixLoRA"):
        load_config(["tiny"], ["model.moe.num_experts=4", "model.moe.lora_rank=4", "model.moe.null_experts=1"])


@pytest.mark.slow  # the default run has its pieces: the layer, the trained params, AddedModules (test_peft_family)
def test_mixlora_finetune_cli_keeps_the_base_and_loads_back(dense_run, tmp_path):
    from jaxllm.cli import main
    from jaxllm.interop.models import load_model

    run = tmp_path / "mixlora"
    assert main(["finetune", "--base", str(dense_run), "finetune.method=mixlora", "model.moe.num_experts=4",
                 "model.moe.lora_rank=4", f"checkpoint.run_dir={run}", "train.steps=4", "train.warmup_steps=0",
                 "train.eval_every=0", "data.seq_len=32", "train.batch_size=8"]) == 0
    dense, tuned = load_model(dense_run), load_model(run)
    assert tuned.lm.cfg.moe.lora_rank == 4
    for name in ("gate", "up", "down"):  # the base FFN is frozen: bitwise the dense one
        np.testing.assert_array_equal(tuned.params["blocks"]["mlp"][name]["kernel"], dense.params["blocks"]["mlp"][name]["kernel"])
    assert np.abs(np.asarray(tuned.params["blocks"]["mlp"]["down_b"])).max() > 0  # the experts trained (B starts at 0)
    with pytest.raises(ConfigError, match="mixlora"):
        load_config(["tiny"], [f"finetune.base={dense_run}", "finetune.method=mixlora"])


def test_lora_on_an_moe_model_adapts_both_block_stacks():
    """LoRA (QLoRA int8) on a model with MoE every other layer: attention in dense and MoE blocks alike."""
    from jaxllm.config import LoraConfig
    from jaxllm.peft import LoraAdapter

    lm = LanguageModel(tiny_model(num_layers=4, moe=MoeConfig(num_experts=4, top_k=2, every=2)))
    adapter = LoraAdapter(lm, LoraConfig(rank=2, targets=["q", "v"], init="gaussian", quantize="int8", quant_block=16))
    assert {t.name for t in adapter.targets} == {"blocks.attn.q", "blocks.attn.v", "moe_blocks.attn.q", "moe_blocks.attn.v"}
    assert ("moe_blocks", "attn", "q", "kernel") in adapter.quantized_paths()
    lora, frozen = adapter.init(jax.random.key(0), lm.init(jax.random.key(1)))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 10))
    apply = jax.jit(lm.apply)
    np.testing.assert_allclose(apply(adapter.apply(frozen, lora), tokens), apply(adapter.merge(frozen, lora), tokens),
                               atol=1e-5)
