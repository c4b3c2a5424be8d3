"""Structured FFN maps: each equals its materialised dense matrix, the block-sparse kernel path has the
einsum path's gradients, sizes hit their param fractions, sharded == single device, pre-merged decoding
gives the factored tokens, and the whole model accounts params/FLOPs exactly."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ConfigError, MlpConfig, load_config
from jaxllm.generate import generate
from jaxllm.language_model import LanguageModel, build
from jaxllm.models.structured import Sizes, StructuredLinear, structure_sizes, structured_params
from jaxllm.sharding import make_mesh

from conftest import tiny_model

STRUCTURES = ["lowrank", "blockdense", "blockshuffle"]
TOL = 1e-5  # f32


def _map(structure, i, o, impl="xla", **sizes):
    cfg = tiny_model(mlp=MlpConfig(d_ff=64, structure=structure, impl=impl, **sizes))
    return StructuredLinear(cfg, i, o, ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(0))


def _shuffle_matrix(n: int, groups: int) -> np.ndarray:
    """Monarch's channel shuffle as an explicit permutation matrix P [n, n] (row vectors: y = x P): channel
    j * (n / groups) + k of the [groups, n / groups] view moves to k * groups + j."""
    P = np.zeros((n, n))
    for j in range(groups):
        for k in range(n // groups):
            P[j * (n // groups) + k, k * groups + j] = 1
    return P


def _block_diag(blocks: np.ndarray) -> np.ndarray:
    """The block-diagonal matrix of blocks [b, r, c], assembled block by block."""
    b, r, c = blocks.shape
    M = np.zeros((b * r, b * c))
    for j in range(b):
        M[j * r:(j + 1) * r, j * c:(j + 1) * c] = blocks[j]
    return M


def dense_matrix(structure: str, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The dense [in, out] matrix a structured map's factors define (the module docstring's formulas), in numpy."""
    v, u = np.asarray(v, np.float64), np.asarray(u, np.float64)
    if structure == "lowrank":
        return v @ u
    if structure == "blockdense":
        return _block_diag(v) @ u
    b = v.shape[0]
    mid, out = b * v.shape[2], b * u.shape[2]
    # x -> P^-1 BD(P BD(x, V), U): the inverse shuffle on the outputs is the [out/b, b] -> [b, out/b] view change
    return _block_diag(v) @ _shuffle_matrix(mid, b) @ _block_diag(u) @ _shuffle_matrix(out, out // b)


def _map_case(structure, i, o, impl="xla", **sizes):
    layer = _map(structure, i, o, impl, **sizes)
    return layer, dense_matrix(structure, layer.v[...], layer.u[...])


@pytest.mark.parametrize("i, o", [(32, 64), (64, 32)])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_each_structure_equals_its_dense_matrix(structure, i, o):
    layer, w = _map_case(structure, i, o)
    x = jax.random.normal(jax.random.key(1), (3, 5, i))
    np.testing.assert_allclose(layer(x), np.asarray(x, np.float64) @ w, atol=TOL, rtol=0)
    np.testing.assert_allclose(layer.dense_kernel(), w, atol=TOL, rtol=0)  # what merging and the guide start from
    # the init keeps the dense init's scale (std 0.02) within sampling error
    assert 0.012 < float(np.std(w)) < 0.03
    assert layer.num_params == sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_each_structure_has_its_rank_and_block_pattern(structure):
    """The map is what its name says: rank r (lowrank, blockdense); Monarch (blockshuffle): every (input
    block, output block) tile has rank <= the paths linking them, (in/b) * (out/b) / (min(in, out) / b^2)."""
    i, o = 32, 64
    layer, w = _map_case(structure, i, o, rank=4 if structure != "blockshuffle" else None, blocks=4)
    if structure in ("lowrank", "blockdense"):
        assert np.linalg.matrix_rank(w, tol=1e-8) == layer.rank == 4
        return
    b, paths = layer.blocks, min(i, o) // layer.blocks ** 2
    out_of = _shuffle_matrix(o, o // b).argmax(1)  # where each column of BD(U) lands after P^-1
    for j in range(b):
        for l in range(b):
            tile = w[j * i // b:(j + 1) * i // b][:, out_of[l * o // b:(l + 1) * o // b]]
            assert np.linalg.matrix_rank(tile, tol=1e-8) == paths, (j, l)
    assert np.linalg.matrix_rank(w, tol=1e-8) == min(i, o)  # the blocks mix: full rank overall


@pytest.mark.parametrize("structure", ["blockdense", "blockshuffle"])
def test_kernel_path_gradients_equal_the_einsum_path(structure):
    x = jax.random.normal(jax.random.key(1), (20, 32))
    dy = jax.random.normal(jax.random.key(2), (20, 64))
    outs = {}
    for impl in ("pallas", "xla"):
        layer = _map(structure, 32, 64, impl=impl)
        graph, params = nnx.split(layer)
        loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x) * dy)
        outs[impl] = (nnx.merge(graph, params)(x), jax.grad(loss, argnums=(0, 1))(params, x))
    np.testing.assert_allclose(outs["pallas"][0], outs["xla"][0], atol=TOL)
    chex.assert_trees_all_close(outs["pallas"][1], outs["xla"][1], atol=TOL)


def _allowed_sizes(structure: str, i: int, o: int):
    """Every size the structure admits for an [i -> o] map (at the default 4 blocks for blockdense)."""
    if structure == "lowrank":
        return [Sizes(r, None) for r in range(1, min(i, o) + 1)]
    if structure == "blockdense":
        return [Sizes(r, 4) for r in range(4, i * o // (i // 4 + o) + 8, 4)]  # up to the dense count
    return [Sizes(None, b) for b in range(1, min(i, o) + 1) if i % b == 0 and o % b == 0]


@pytest.mark.parametrize("fraction", [0.63, 0.32, 0.1])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_param_fraction_picks_the_nearest_size(structure, fraction):
    """The sizing rule's promise: of the sizes the structure admits, the one whose parameter count is
    nearest fraction * in * out (found here by enumerating them all)."""
    mlp = MlpConfig(d_ff=1536, structure=structure, param_fraction=fraction)
    for i, o in ((512, 1536), (1536, 512), (96, 160)):
        got = structured_params(structure, structure_sizes(mlp, i, o), i, o)
        best = min(abs(structured_params(structure, s, i, o) - fraction * i * o) for s in _allowed_sizes(structure, i, o))
        assert abs(got - fraction * i * o) == pytest.approx(best), (i, o, got)


def test_sizes_set_directly_and_their_errors():
    assert structure_sizes(MlpConfig(structure="lowrank", rank=7), 32, 64).rank == 7
    assert structure_sizes(MlpConfig(structure="blockdense", rank=16, blocks=8), 32, 64) == Sizes(16, 8)
    with pytest.raises(ConfigError, match="rank=40 exceeds min"):
        structure_sizes(MlpConfig(structure="lowrank", rank=40), 32, 64)
    with pytest.raises(ConfigError, match="blocks=3 must divide"):  # checked when the model is built
        build(load_config(["tiny"], ["model.mlp.structure=blockshuffle", "model.mlp.blocks=3"]))
    with pytest.raises(ConfigError, match="model.mlp.structure='monarch' is not allowed"):
        load_config(["tiny"], ["model.mlp.structure=monarch"])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_model_accounting_and_merged_model(structure):
    cfg = tiny_model(mlp=MlpConfig(d_ff=64, structure=structure))
    lm = LanguageModel(cfg)
    dense = LanguageModel(dataclasses.replace(cfg, mlp=MlpConfig(d_ff=64)))
    D, F = cfg.d_model, cfg.mlp.d_ff
    ffn = sum(structured_params(structure, structure_sizes(cfg.mlp, i, o), i, o) for i, o in ((D, F), (D, F), (F, D)))
    assert lm.num_params == dense.num_params - cfg.num_layers * 3 * D * F + cfg.num_layers * ffn
    assert lm.flops_per_token(16) == pytest.approx(dense.flops_per_token(16) - 3 * 2 * cfg.num_layers * (3 * D * F - ffn))
    params = lm.init(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 11))
    merged = lm.merge_params(params)
    for name, factors in params["blocks"]["mlp"].items():  # each merged kernel is the numpy matrix of its factors
        for layer in range(cfg.num_layers):
            want = dense_matrix(structure, factors["v"][layer], factors["u"][layer])
            np.testing.assert_allclose(merged["blocks"]["mlp"][name]["kernel"][layer], want, atol=TOL, err_msg=name)
    np.testing.assert_allclose(lm.merged_model.apply(merged, tokens), lm.apply(params, tokens), atol=TOL)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_premerged_decoding_gives_the_factored_tokens(structure):
    cfg = tiny_model(mlp=MlpConfig(d_ff=64, structure=structure))
    params = LanguageModel(cfg).init(jax.random.key(0))
    prompts = [[1, 5, 9, 12], [3, 4]]
    factored = generate(LanguageModel(cfg), params, prompts, 12)
    merged_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, merge_below_tokens=8))  # decode merged
    assert generate(LanguageModel(merged_cfg), params, prompts, 12) == factored


# blockdense's params are blockshuffle's without the shuffle (the same logical axes): in the slow set
@pytest.mark.parametrize("structure", [pytest.param(s, marks=pytest.mark.slow) if s == "blockdense" else s
                                       for s in STRUCTURES])
def test_sharded_equals_single_device(structure):
    cfg = load_config(["tiny", "mesh/fsdp_tp"], [f"model.mlp.structure={structure}", "model.mlp.blocks=2"])
    lm = build(cfg)
    params = lm.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 320, (8, 24)), "targets": rng.integers(0, 320, (8, 24))}
    want_loss, want_grads = jax.jit(jax.value_and_grad(lambda p: lm.loss(p, batch)[0]))(params)
    mesh = make_mesh(cfg.mesh)
    shardings = lm.param_shardings(mesh)
    if structure != "lowrank":  # block-diagonal factors split their block axis over `tensor`
        assert shardings["blocks"]["mlp"]["up"]["v"].spec[1] == "tensor"
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(lambda p: lm.loss(p, batch)[0]))(jax.device_put(params, shardings))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(grads), want_grads, atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------------------ self-guided training

from jaxllm.models.structured import GuidedKernel, guide_alpha  # noqa: E402


@pytest.mark.parametrize("structure", STRUCTURES)
def test_guided_layer_is_the_guide_at_1_and_the_structure_at_0(structure):
    cfg = tiny_model(mlp=MlpConfig(d_ff=64, structure=structure, guide_fraction=0.5))
    layer = StructuredLinear(cfg, 32, 64, ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer.guide[...], layer.dense_kernel(), atol=1e-6)  # starts as the product
    layer.guide.value = layer.guide[...] + 0.1 * jax.random.normal(jax.random.key(5), (32, 64))  # as if trained apart
    x = jax.random.normal(jax.random.key(1), (7, 32))
    structured = x @ layer.dense_kernel()
    run = lambda a, key=None, sampled=False: layer._guided(x, structured, GuidedKernel(layer.guide[...], jnp.float32(a), key, sampled))
    np.testing.assert_allclose(run(1.0), x @ layer.guide[...], atol=TOL)
    np.testing.assert_allclose(run(0.0), structured, atol=TOL)
    np.testing.assert_allclose(run(0.3), 0.3 * (x @ layer.guide[...]) + 0.7 * structured, atol=TOL)
    # sampled: the mixture with probability a, else the structured path alone (dense matmul skipped)
    outs = [run(0.5, jax.random.key(k), True) for k in range(40)]
    mixed = [bool(np.allclose(o, run(0.5), atol=TOL)) for o in outs]
    alone = [bool(np.allclose(o, structured, atol=TOL)) for o in outs]
    assert all(m or a for m, a in zip(mixed, alone)) and 8 < sum(mixed) < 32


def test_guide_schedules():
    assert [guide_alpha(s, 10, "linear") for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    np.testing.assert_allclose([guide_alpha(s, 10, "cosine") for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-12)


def test_self_guided_run_drops_guides_and_resumes_on_both_sides_of_the_switch(tmp_path):
    import shutil

    from jaxllm.train.checkpoint import Checkpointer
    from jaxllm.train.methods.self_guided import without_guides
    from jaxllm.train.setup import setup_step
    from jaxllm.train.trainer import train

    overrides = ["model.mlp.structure=lowrank", "model.mlp.guide_fraction=0.5", "train.steps=8", "train.log_every=1",
                 "train.eval_every=0", "checkpoint.save_every=2", "checkpoint.keep_last=10", "checkpoint.async_save=false",
                 "train.warmup_steps=1"]
    full = train(load_config(["tiny"], overrides + [f"checkpoint.run_dir={tmp_path / 'full'}"]))
    cfg = load_config(["tiny"], overrides + [f"checkpoint.run_dir={tmp_path / 'full'}"])
    after = setup_step(without_guides(cfg))
    restored = Checkpointer(tmp_path / "full" / "checkpoints", cfg.checkpoint).restore_latest(after.abstract_state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(restored[1])[0]]
    assert restored[0] == 8 and paths and not any("guide" in p for p in paths)  # params and optimizer state
    for resume_at in (2, 6):  # before the switch (step 4) and after it
        run = tmp_path / f"from{resume_at}"
        shutil.copytree(tmp_path / "full", run)
        for d in (run / "checkpoints").iterdir():
            if d.name.isdigit() and int(d.name) > resume_at:
                shutil.rmtree(d)
        from jaxllm.interop.models import load_model

        loaded = load_model(run)  # either side of the switch loads (for generate / eval)
        guide = loaded.params["blocks"]["mlp"]["up"].get("guide")
        assert (guide is not None) == (resume_at < 4)
        if guide is not None:
            np.testing.assert_allclose(guide.alpha, guide_alpha(resume_at, 4, "cosine"))
        resumed = train(load_config(["tiny"], overrides + [f"checkpoint.run_dir={run}"]))
        assert resumed.start_step == resume_at
        for step, loss in resumed.losses.items():
            assert loss == full.losses[step], f"step {step}: resumed {loss} != uninterrupted {full.losses[step]}"


def test_structure_sizes_that_do_not_fit_fail_when_the_model_is_built(capsys):
    cfg = load_config(["tiny"], ["model.mlp.structure=lowrank", "model.mlp.rank=10000"])  # config: plain data
    from jaxllm.language_model import build

    with pytest.raises(ConfigError, match="model.mlp.rank=10000 exceeds min"):
        build(cfg)  # before anything compiles
    from jaxllm.cli import main

    assert main(["info", "--config", "tiny", "model.mlp.structure=blockdense", "model.mlp.blocks=7"]) == 2
    assert "model.mlp.blocks=7 must divide" in capsys.readouterr().err
