"""The PEFT family beyond LoRA, each as a training method: HFT (half of each layer's categories train, the rest stays
bitwise the base; the trained half moves as full fine-tuning moves it), SORSA (principal singular triplets
against numpy's SVD, its regulariser against the numpy formula), S²FT (gradients = full fine-tuning's on the chosen rows, state
sized to them), Bone, Bat, ABBA, CorDA and bottleneck adapters (their parity is in tests/test_peft_parity.py); each runs through `jaxllm finetune` on 8 devices (fsdp x tensor) with the losses of one
device, resuming exactly."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed, tiny_model
from jaxllm.cli import main
from jaxllm.config import LoraConfig, load_config
from jaxllm.data.pipeline import RowStreams, load_corpus, local_rows
from jaxllm.language_model import LanguageModel
from jaxllm.peft.half_finetune import half_masks, split_stacked
from jaxllm.peft.s2ft import S2ftAdapter
from jaxllm.peft.sorsa import SorsaAdapter
from jaxllm.nested import get_path
from jaxllm.train.setup import load_run, setup_step
from jaxllm.train.step import make_train_step
from jaxllm.train.trainer import resolve_finetune_config


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ------------------------------------------------------------------------------------------------------------ HFT
def test_hft_trains_half_of_each_category_in_every_layer():
    lm = LanguageModel(tiny_model(num_layers=4))
    stacks, rest = split_stacked(lm.param_shapes, lm.logical_axes)
    assert sorted(stacks) == ["blocks"] and "embed" in rest and "lm_head" in rest
    masks = half_masks(stacks, seed=0)
    blocks = {k.rsplit("']['", 1)[0].removeprefix("['blocks']['"): m.reshape(-1) for k, m in _leaves(masks).items()}
    attention = np.stack([blocks[f"attn']['{n}"] for n in "qkvo"])  # [4 modules, 4 layers]
    mlp = np.stack([blocks[f"mlp']['{n}"] for n in ("gate", "up", "down")])
    norms = np.stack([blocks["attn_norm"], blocks["mlp_norm"]])
    np.testing.assert_array_equal(attention.sum(0), [2, 2, 2, 2])
    np.testing.assert_array_equal(mlp.sum(0), [2, 1, 2, 1])  # 3 matrices: 2 and 1 alternately, half of the stack
    np.testing.assert_array_equal(norms.sum(0), [1, 1, 1, 1])
    assert len({tuple(attention[:, layer]) for layer in range(4)}) > 1  # drawn per layer
    again, other = half_masks(stacks, seed=0), half_masks(stacks, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(again)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(other)))


def _cfg(base, data, *overrides):
    return resolve_finetune_config(str(base), ["finetune/lora"], [
        f"data.source={data}", "data.seq_len=64", "train.batch_size=8", "train.steps=4", "train.warmup_steps=0",
        *overrides])


def _steps(setup, batch, n):
    state = setup.init()
    with jax.set_mesh(setup.mesh):
        for _ in range(n):
            state, _ = setup.train_step(state, setup.global_batch(batch), setup.frozen)
    return setup.method.model_params(state.params, setup.frozen, n)


def test_hft_moves_the_drawn_half_as_full_finetuning_and_keeps_the_rest_bitwise(base_and_data):
    base, data = base_and_data
    hft = setup_step(_cfg(base, data, "finetune.method=hft"))
    full = setup_step(_cfg(base, data, "finetune.method=full"))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 256, (8, 64)), "targets": rng.integers(0, 256, (8, 64)),
             "loss_mask": np.ones((8, 64), np.float32)}
    start = _leaves(jax.device_get(hft.method.model_params(hft.init().params, hft.frozen, 0)))
    masks = _leaves({"blocks": half_masks(hft.abstract_state.params, 0)["blocks"]})
    one_hft, one_full = _leaves(_steps(hft, batch, 1)), _leaves(_steps(full, batch, 1))
    three_hft = _leaves(_steps(hft, batch, 3))
    for name, before in start.items():
        if name not in masks:  # outside the layer stack: frozen
            np.testing.assert_array_equal(three_hft[name], before)
            continue
        trains = masks[name].reshape(-1).astype(bool)
        np.testing.assert_array_equal(three_hft[name][~trains], before[~trains])  # the frozen half: bitwise
        assert not trains.any() or not np.array_equal(three_hft[name][trains], before[trains])
        # one step from the same start: the trained half is where full fine-tuning puts it
        np.testing.assert_allclose(one_hft[name][trains], one_full[name][trains], rtol=1e-6, atol=1e-7)
    # the step performs full fine-tuning's FLOPs but the head's weight gradient
    cfg = hft.lm.cfg
    assert full.flops_per_token(64) - hft.flops_per_token(64) == 2 * cfg.vocab_size * cfg.d_model


# ---------------------------------------------------------------------------------------------------------- SORSA
@pytest.fixture(scope="module")
def sorsa():
    lm = LanguageModel(tiny_model())
    params = lm.init(jax.random.key(0))
    adapter = SorsaAdapter(lm, LoraConfig(rank=4, targets=["q", "o", "down"]))
    trained, frozen = adapter.init(jax.random.key(1), params)
    return lm, params, adapter, trained, frozen


def test_sorsa_adapters_are_the_principal_singular_triplets(sorsa):
    lm, params, adapter, trained, frozen = sorsa
    assert [t.name for t in adapter.targets] == ["blocks.attn.o", "blocks.attn.q", "blocks.mlp.down"]
    for t in adapter.targets:
        leaves = {k: np.asarray(v, np.float64) for k, v in trained["blocks"][t.path[1]][t.path[2]].items()}
        w = np.asarray(params["blocks"][t.path[1]][t.path[2]]["kernel"], np.float64)
        residual = np.asarray(frozen["blocks"][t.path[1]][t.path[2]]["kernel"], np.float64)
        for layer in range(w.shape[0]):
            w_IO = w[layer].reshape(np.prod(t.in_shape), -1)
            u, s, vt = np.linalg.svd(w_IO, full_matrices=False)
            a, b = leaves["a"][layer].reshape(w_IO.shape[0], 4), leaves["b"][layer].reshape(4, -1)
            np.testing.assert_allclose(leaves["s"][layer], s[:4], rtol=1e-5)
            principal = u[:, :4] * s[:4] @ vt[:4]
            np.testing.assert_allclose(a * leaves["s"][layer] @ b, principal, atol=1e-5)
            np.testing.assert_allclose(residual[layer].reshape(w_IO.shape), w_IO - principal, atol=1e-5)
            np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)
    tokens = np.arange(20).reshape(2, 10)
    logits = jax.jit(lm.apply)  # one compile per params structure (eagerly, the layer scan runs op by op)
    np.testing.assert_allclose(logits(adapter.apply(frozen, trained), tokens), logits(params, tokens), atol=1e-5)


def test_sorsa_regulariser_is_the_orthonormality_formula_and_merging_keeps_the_function(sorsa):
    lm, params, adapter, trained, frozen = sorsa
    moved = perturbed(trained, 2)
    expected = 0.0
    for t in adapter.targets:
        node = moved["blocks"][t.path[1]][t.path[2]]
        for layer in range(2):
            a = np.asarray(node["a"][layer], np.float64).reshape(-1, 4)
            vt = np.asarray(node["b"][layer], np.float64).reshape(4, -1)
            expected += np.linalg.norm(a.T @ a - np.eye(4)) + np.linalg.norm(vt @ vt.T - np.eye(4))
    np.testing.assert_allclose(adapter.orthonormality(moved), expected, rtol=1e-5)
    assert float(adapter.orthonormality(trained)) < 1e-4  # at init: orthonormal
    grads = jax.grad(adapter.orthonormality)(trained)  # finite where the norm is ~0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    tokens = np.arange(20).reshape(2, 10)
    logits = jax.jit(lm.apply)
    unmerged = logits(adapter.apply(frozen, moved), tokens)
    np.testing.assert_allclose(logits(adapter.merge(frozen, moved), tokens), unmerged, atol=1e-4)
    assert np.abs(np.asarray(unmerged) - np.asarray(logits(params, tokens))).max() > 1e-2  # the adapter matters


# ----------------------------------------------------------------------------------------------------------- S²FT
def test_s2ft_gradients_are_full_finetunings_on_the_chosen_rows_and_zero_elsewhere():
    lm = LanguageModel(tiny_model())
    params = lm.init(jax.random.key(0))
    adapter = S2ftAdapter(lm, head_fraction=0.25, channel_fraction=0.05, seed=0)  # 1 of 4 heads, 3 of 64 channels
    rows_o, rows_down = adapter.rows[("blocks", "attn", "o")], adapter.rows[("blocks", "mlp", "down")]
    head_dim = lm.cfg.resolved_head_dim
    assert rows_o.shape == (2, head_dim) and rows_down.shape == (2, 3)
    for layer in rows_o:  # one whole head's rows
        assert layer[0] % head_dim == 0 and list(layer) == list(range(layer[0], layer[0] + head_dim))
    deltas, frozen = adapter.init(jax.random.key(1), params)
    tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
    weights = jax.random.normal(jax.random.key(2), (2, 12, 97))
    score = lambda p: jnp.sum(lm.apply(p, tokens) * weights)
    full = jax.jit(jax.grad(score))(params)
    ours = jax.jit(jax.grad(lambda d: score(adapter.apply(frozen, d))))(deltas)
    D = lm.cfg.d_model  # both maps write the residual stream
    assert sorted(x.shape for x in jax.tree.leaves(ours)) == [(2, 3, D), (2, head_dim, D)]
    for path, rows in adapter.rows.items():
        g_full = np.asarray(full["blocks"][path[1]][path[2]]["kernel"]).reshape(2, -1, D)
        g_ours = np.asarray(ours["blocks"][path[1]][path[2]]["delta"])
        for layer in range(2):
            np.testing.assert_allclose(g_ours[layer], g_full[layer][rows[layer]], rtol=1e-4, atol=1e-6)
    moved = perturbed(deltas, 3)
    logits = jax.jit(lm.apply)
    adapted = logits(adapter.apply(frozen, moved), tokens)
    merged = adapter.merge(frozen, moved)
    np.testing.assert_allclose(logits(merged, tokens), adapted, atol=1e-5)
    changed = np.asarray(merged["blocks"]["mlp"]["down"]["kernel"]) != np.asarray(params["blocks"]["mlp"]["down"]["kernel"])
    assert set(np.nonzero(changed.any(axis=-1))[1]) <= set(rows_down.reshape(-1))  # only the chosen rows moved
    back = adapter.unmerge(merged, moved)
    np.testing.assert_allclose(back["blocks"]["attn"]["o"]["kernel"], params["blocks"]["attn"]["o"]["kernel"], atol=1e-6)


# ----------------------------------------------------------------------------------------------------- bottleneck
def test_bottleneck_method_counts_its_flops_and_refuses_what_it_cannot_do(base_and_data):
    """Weight gradients only for the adapters' kernels (counted from the params tree); a missing width, an unknown
    placement, a base that has adapters already and a Hugging Face export are clear errors."""
    import dataclasses

    from jaxllm.config import BottleneckConfig, ConfigError
    from jaxllm.interop.hf_mapping import model_type_of
    from jaxllm.train.methods import method_for
    from jaxllm.train.methods.base_model import Base

    base, data = base_and_data
    args = ["finetune.method=bottleneck", f"data.source={data}", "data.seq_len=64"]
    with pytest.raises(ConfigError, match="needs model.bottleneck.width"):
        resolve_finetune_config(str(base), ["finetune/lora"], args)
    with pytest.raises(ConfigError, match="model.bottleneck.placement='beside'"):
        resolve_finetune_config(str(base), ["finetune/lora"], [*args, "model.bottleneck.width=4",
                                                                 "model.bottleneck.placement=beside"])
    cfg = resolve_finetune_config(str(base), ["finetune/lora"], [*args, "model.bottleneck.width=4",
                                                                 "model.bottleneck.sublayers=[attn,mlp]"])
    lm = LanguageModel(cfg.model)
    method = method_for(cfg, lm)
    shapes = jax.tree_util.tree_leaves_with_path(lm.param_shapes)
    adapter_kernels = sum(x.size for p, x in shapes if "adapter" in jax.tree_util.keystr(p) and "kernel" in str(p[-1]))
    assert adapter_kernels == 2 * 2 * 2 * cfg.model.d_model * 4  # layers x sublayers x (down, up)
    assert method.flops_per_token(64) == lm.flops_per_token(64) - 2 * (lm.active_matmul_params - adapter_kernels)
    with pytest.raises(ConfigError, match="without model.bottleneck modules"):
        method.prepare(None, jax.random.key(0), Base(cfg.model, lm.init(jax.random.key(0))))
    with pytest.raises(ConfigError, match="bottleneck adapters"):
        model_type_of(dataclasses.replace(tiny_model(), bottleneck=BottleneckConfig(width=4)))


# ----------------------------------------------------------------------------------- every method through the CLI
def _logged(run, name):
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines() if name in line]


# a method's own settings in the test; two targets keep the SVD inits and the calibration small
EXTRA = {"sorsa": ["finetune.lora.targets=[q,down]"],
         "corda": ["finetune.calibration.samples=4", "finetune.lora.targets=[q,down]"],
         "bottleneck": ["model.bottleneck.width=8", "model.bottleneck.sublayers=[attn,mlp]"],
         "maskllm": ["finetune.calibration.samples=4"]}

# `pytest -m slow` runs every method through the CLI; the default run has their pieces: HFT's masks and steps above,
# the trainer's sharded LoRA path (tests/test_finetune.py), a method registered outside the library trained, resumed
# and exported (tests/test_training_method.py), and the sharded objectives below.
ADAPTER_METHODS = ["sorsa", "corda", "bone", "bat", "abba", "s2ft", "bottleneck", "maskllm"]
CLI_METHODS = [pytest.param(m, marks=pytest.mark.slow) for m in ["hft", *ADAPTER_METHODS]]
# sharded by default: a regulariser (sorsa) and added modules (bottleneck); calibration on a mesh is checked in
# tests/test_compress.py; CorDA, S²FT's rows, the kernels of bone, bat and abba, and MaskLLM's logits with
# `pytest -m slow`
SHARDED = [m if m in ("sorsa", "bottleneck") else pytest.param(m, marks=pytest.mark.slow) for m in ADAPTER_METHODS]


@pytest.mark.parametrize("method", SHARDED)
def test_adapter_kernels_shard_fsdp_tp_like_one_device(method, base_and_data):
    """The training objective (with SORSA's regulariser) and the adapter's gradient on 8 devices (fsdp 4 x tensor 2)
    equal one device's, adapters moved off their init."""
    base, data = base_and_data
    setup = setup_step(resolve_finetune_config(str(base), ["finetune/lora"], [
        f"finetune.method={method}", f"data.source={data}", "data.seq_len=64", "mesh.data=1", "mesh.fsdp=4",
        "mesh.tensor=2", *EXTRA.get(method, [])]))
    trained = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), perturbed(setup.init().params, 3),
                           setup.abstract_state.params)
    assert {d for x in jax.tree.leaves(trained) for d in x.sharding.device_set} == set(jax.devices())
    rng = np.random.default_rng(2)
    batch = {"inputs": rng.integers(0, 256, (8, 64)), "targets": rng.integers(0, 256, (8, 64)),
             "loss_mask": np.ones((8, 64), np.float32)}
    m = setup.method  # the loss the step minimises: the model's plus the method's regularisers (SORSA's)
    objective = lambda t, f, b: setup.lm.loss(m.to_model(t, f, None), b)[0] + sum(m.regularizers(t, f).values())
    loss = jax.jit(jax.value_and_grad(objective))
    with jax.set_mesh(setup.mesh):
        value, grads = loss(trained, setup.frozen, setup.global_batch(batch))
    one = jax.devices()[0]
    ref_value, ref_grads = loss(*jax.device_put(jax.tree.map(np.asarray, (trained, setup.frozen, batch)), one))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", CLI_METHODS)
def test_method_finetunes_sharded_like_one_device_and_resumes_exactly(method, base_and_data, tmp_path, capsys):
    """Through `jaxllm finetune` on 8 devices (fsdp 4 x tensor 2): the logged losses are those of the same steps run
    on one device (the step jitted without shardings on the trainer's batches), and a run resumed from its step-2
    checkpoint logs steps 3 and 4 bitwise as the uninterrupted one."""
    base, data = base_and_data
    overrides = [f"finetune.method={method}", f"data.source={data}", "data.format=sft", "data.seq_len=64",
                 "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "train.warmup_steps=1", "train.steps=4",
                 "train.learning_rate=1e-2", "checkpoint.save_every=2", "checkpoint.keep_last=5",
                 "checkpoint.async_save=false", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", *EXTRA.get(method, [])]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["finetune", "--base", str(base), *overrides, f"checkpoint.run_dir={straight}"]) == 0
    shutil.copytree(straight, resumed)  # as if stopped right after saving step 2
    shutil.rmtree(resumed / "checkpoints" / "4")
    capsys.readouterr()
    assert main(["finetune", "--base", str(base), *overrides, f"checkpoint.run_dir={resumed}"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    losses = _logged(straight, "train/loss")
    assert _logged(resumed, "train/loss")[-2:] == losses[-2:]  # steps 3, 4, bitwise
    assert losses[-1] < losses[0]

    cfg = load_config([straight / "config.yaml"])
    setup = setup_step(cfg)  # its programs come from the run's compilation cache
    assert {d for x in jax.tree.leaves(setup.frozen) for d in x.sharding.device_set} == set(jax.devices())
    corpus = load_corpus(cfg.data)
    batches = RowStreams(corpus.train_docs, corpus.tokenizer, seq_len=64, global_batch=8, seed=cfg.data.seed,
                         rows=local_rows(8, 0, 1), repeat=True, encode=corpus.encode)
    one = jax.devices()[0]
    state, frozen = jax.device_put(jax.tree.map(np.array, (setup.init(), setup.frozen)), one)
    m = setup.method
    step = jax.jit(make_train_step(setup.lm, setup.tx, to_model=m.to_model, regularizers=m.regularizers,
                                   update_mask=m.update_mask))
    single = []
    for i in range(4):  # the method's fixed input at each step (MaskLLM: its annealed temperature and scale)
        state, metrics = step(state, jax.device_put(next(batches), one), jax.device_put(m.frozen_at(frozen, i), one))
        single.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, single, rtol=1e-5)
    if method == "sorsa":  # the regulariser is in the loss and the log
        ortho, ce = _logged(straight, "train/method/orthonormality"), _logged(straight, "train/cross_entropy")
        np.testing.assert_allclose(np.array(losses) - np.array(ce), ortho, atol=1e-6)
        assert ortho[-1] > ortho[0]
    if method == "s2ft":  # gradients and optimizer state for the chosen rows only
        rows = setup.method.adapter.rows
        assert sorted(x.shape for x in jax.tree.leaves(setup.init().params)) == sorted(
            (2, r.shape[1], 64) for r in rows.values())
        moments = [x for x in jax.tree.leaves(setup.init().opt_state) if x.ndim > 0]
        assert sum(x.size for x in moments) == 2 * sum(r.size * 64 for r in rows.values())
    if method not in ("hft", "s2ft", "bottleneck", "maskllm"):  # adapters leave a peft directory (parity: tests/test_peft_parity.py)
        assert (straight / "adapter" / "adapter_model.safetensors").exists()
    if method == "bottleneck":  # the run is a model with adapters, the base's weights bitwise in it
        saved_cfg, lm, params = load_run(straight)
        assert saved_cfg.model.bottleneck.width == 8
        _, _, base_params = load_run(base)
        for path, x in jax.tree_util.tree_leaves_with_path(base_params):
            assert np.array_equal(np.asarray(x), np.asarray(get_path(params, tuple(k.key for k in path))))
        assert np.abs(np.asarray(params["blocks"]["mlp_adapter"]["up"]["kernel"])).max() > 0
