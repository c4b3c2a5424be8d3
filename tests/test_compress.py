"""Pruning (Wanda, magnitude; unstructured and N:M) against numpy loops on the same statistics; the calibration norms
against transformers' layer inputs captured by forward hooks (scanned and unrolled layers, one device and 8);
`jaxllm compress` end to end on a jaxllm run (then eval, generate, convert) and on a Hugging Face model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.compress.masks import n_of_m_keep, unstructured_keep
from jaxllm.compress.prune import PruneSpec, input_norms, keep_mask, prune, sparsity_of
from jaxllm.config import ConfigError, MeshConfig
from jaxllm.language_model import LanguageModel
from jaxllm.nested import get_path
from jaxllm.peft.lora import find_targets
from jaxllm.sharding import make_mesh

torch = pytest.importorskip("torch", reason="the calibration reference is transformers' model (the [hf] extra)")
transformers = pytest.importorskip("transformers")

HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def np_unstructured_keep(scores, sparsity, per_output):
    I, O = scores.shape
    keep = np.ones((I, O), bool)
    if per_output:
        for j in range(O):
            keep[np.argsort(scores[:, j], kind="stable")[: int(sparsity * I)], j] = False
    else:
        keep.reshape(-1)[np.argsort(scores.reshape(-1), kind="stable")[: int(sparsity * I * O)]] = False
    return keep


def np_n_of_m_keep(scores, n, m):
    I, O = scores.shape
    keep = np.zeros((I, O), bool)
    for j in range(O):
        for g in range(0, I, m):
            keep[g + np.argsort(-scores[g:g + m, j], kind="stable")[:n], j] = True
    return keep


@pytest.mark.parametrize("how", ["wanda-0.5", "wanda-0.3", "magnitude-0.5", "wanda-2:4", "wanda-4:8", "magnitude-2:4"])
def test_masks_equal_the_numpy_loops(how):
    method, amount = how.split("-")
    pattern = tuple(int(p) for p in amount.split(":")) if ":" in amount else None
    spec = PruneSpec(method=method, sparsity=0.0 if pattern else float(amount), pattern=pattern)
    rng = np.random.default_rng(0)
    w, norms = rng.normal(size=(64, 48)).astype(np.float32), rng.uniform(0.1, 3, 64).astype(np.float32)
    keep = np.asarray(keep_mask(w, norms if method == "wanda" else None, spec))
    scores = np.abs(w) * (norms[:, None] if method == "wanda" else 1)
    want = (np_n_of_m_keep(scores, *pattern) if pattern
            else np_unstructured_keep(scores, spec.sparsity, per_output=method == "wanda"))
    np.testing.assert_array_equal(keep, want)
    assert 1 - keep.mean() == pytest.approx(spec.target_sparsity, abs=1 / 64)  # int(sparsity * inputs) per output
    if method == "wanda" and not pattern:  # Wanda's group is an output: every column loses exactly its share
        assert set((~keep).sum(0)) == {int(spec.sparsity * 64)}
    # the kernels alone, too (the mask functions know nothing of methods)
    np.testing.assert_array_equal(np.asarray(unstructured_keep(scores, 0.5, True)), np_unstructured_keep(scores, 0.5, True))
    np.testing.assert_array_equal(np.asarray(n_of_m_keep(scores, 2, 4)), np_n_of_m_keep(scores, 2, 4))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from jaxllm.interop.hf_checkpoint import load_hf_checkpoint

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path, safe_serialization=True)
    lm, params, _ = load_hf_checkpoint(path)
    return path, model, lm, params


def _torch_norms(model, rows):
    """{(layer, name): ||X_i||_2 [in]} of each projection's input over `rows`, by forward hooks."""
    sums, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, hf in HF_NAMES.items():
            def hook(module, args, _out, key=(i, name)):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
            hooks.append(model.model.layers[i].get_submodule(hf).register_forward_hook(hook))
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor(row)[None])
    for h in hooks:
        h.remove()
    return {k: np.sqrt(v) for k, v in sums.items()}


ROWS = [np.random.default_rng(s).integers(0, 96, 16) for s in range(3)]


def test_calibration_norms_equal_transformers_layer_inputs_scanned_unrolled_and_sharded(hf_llama):
    _, model, lm, params = hf_llama
    want = _torch_norms(model, ROWS)
    targets = find_targets(lm, ("q", "k", "v", "o", "gate", "up", "down"), "test")
    unrolled = LanguageModel(dataclasses.replace(lm.cfg, scan_layers=False))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    with jax.set_mesh(mesh):
        sharded = input_norms(lm, jax.device_put(params, lm.param_shardings(mesh)), targets, ROWS)
    for got in (input_norms(lm, params, targets, ROWS), input_norms(unrolled, params, targets, ROWS), sharded):
        for t in targets:
            for i in range(2):
                np.testing.assert_allclose(np.asarray(get_path(got, t.path)["stat"][i]), want[i, t.path[-1]],
                                           rtol=1e-4, atol=1e-5)


def _mask(params, t, layer):
    w = np.asarray(get_path(params, t.path + ("kernel",))[layer])
    return (w != 0).reshape(-1, w.shape[-1] if t.path[-1] in ("down", "gate", "up") else int(np.prod(t.out_shape)))


def test_wanda_prunes_by_the_formula_one_shot_and_layer_by_layer(hf_llama):
    """One-shot Wanda's masks are the numpy loops' on the same statistics; layer by layer, layer 0 is as one-shot
    and layer 1's statistics come from the model with layer 0 pruned (transformers' model, pruned alike)."""
    _, model, lm, params = hf_llama
    targets = find_targets(lm, ("q", "k", "v", "o", "gate", "up", "down"), "test")
    norms = input_norms(lm, params, targets, ROWS)
    one_shot = prune(lm, params, PruneSpec(sequential=False), ROWS)
    for t in targets:
        for i in range(2):
            w = np.asarray(get_path(params, t.path + ("kernel",))[i])
            w = w.reshape(int(np.prod(t.in_shape)), -1)
            scores = np.abs(w) * np.asarray(get_path(norms, t.path)["stat"][i])[:, None]
            np.testing.assert_array_equal(_mask(one_shot, t, i), np_unstructured_keep(scores, 0.5, True))
    assert sparsity_of(lm, one_shot)["all"] == 0.5

    sequential = prune(lm, params, PruneSpec(), ROWS)
    with torch.no_grad():  # transformers' model with jaxllm's pruned layer 0
        for t in targets:
            hf = model.model.layers[0].get_submodule(HF_NAMES[t.path[-1]])
            hf.weight.mul_(torch.tensor(_mask(sequential, t, 0).T.astype(np.float32)))
    want = _torch_norms(model, ROWS)
    agree = []
    for t in targets:
        np.testing.assert_array_equal(_mask(sequential, t, 0), _mask(one_shot, t, 0))
        w = np.asarray(get_path(params, t.path + ("kernel",))[1]).reshape(int(np.prod(t.in_shape)), -1)
        agree.append(np.mean(_mask(sequential, t, 1) == np_unstructured_keep(np.abs(w) * want[1, t.path[-1]][:, None],
                                                                             0.5, True)))
    assert min(agree) > 0.995  # float32 vs float64 statistics may swap a pair of near-equal scores at the cut
    assert any((_mask(sequential, t, 1) != _mask(one_shot, t, 1)).any() for t in targets)  # layer 0 mattered


def test_bad_pruning_requests_are_clear_errors(hf_llama):
    _, _, lm, params = hf_llama
    with pytest.raises(ConfigError, match="Wanda needs calibration"):
        prune(lm, params, PruneSpec(), [])
    with pytest.raises(ConfigError, match=r"3:4 .*not a multiple|inputs, not a multiple"):
        prune(lm, params, PruneSpec(pattern=(3, 5)), ROWS)
    with pytest.raises(ConfigError, match="within"):
        prune(lm, params, PruneSpec(method="magnitude", sparsity=1.0))
    with pytest.raises(ConfigError, match="0 < N < M"):
        prune(lm, params, PruneSpec(pattern=(4, 4)), ROWS)


@pytest.mark.slow  # the default run has the CLI on a Hugging Face model (below) and eval/generate/convert of run dirs
def test_compress_cli_on_a_jaxllm_run_then_eval_generate_convert(base_and_data, tmp_path, capsys):
    from jaxllm.train.setup import load_run

    base, _ = base_and_data
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "wanda24"
    assert main(["compress", "--model", str(base), "--method", "wanda", "--pattern", "2:4", "--data", str(calib),
                 "--samples", "2", "--seq-len", "32", "--one-shot", "--out", str(out)]) == 0
    record = json.loads((out / "compression.json").read_text())
    assert record["sparsity"]["all"] == 0.5 and record["calibration_rows"] == 2 and not record["sequential"]
    assert main(["eval", "--model", str(out), "--data", str(calib), "--seq-len", "32"]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    hf = tmp_path / "hf"
    assert main(["convert", str(out), str(hf)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # [out, in]: 2 of every 4 inputs kept
    assert ((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    spqr_out = tmp_path / "spqr"
    assert main(["compress", "--model", str(base), "--method", "spqr", "--targets", "down", "--data", str(calib),
                 "--samples", "2", "--seq-len", "32", "--out", str(spqr_out)]) == 0
    record = json.loads((spqr_out / "compression.json").read_text())
    assert 3.6 < record["bits_per_param"] < 4.2 and record["spqr"]["bits"] == 3
    _, _, quantised = load_run(spqr_out)  # a run directory with the dequantised weights
    assert not np.array_equal(np.asarray(quantised["blocks"]["mlp"]["down"]["kernel"]),
                              np.asarray(load_run(base)[2]["blocks"]["mlp"]["down"]["kernel"]))
    assert main(["compress", "--model", str(base), "--method", "wanda", "--out", str(tmp_path / "x")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["compress", "--model", str(base), "--method", "magnitude", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_compress_cli_on_a_hugging_face_model_loads_in_transformers(hf_llama, tmp_path):
    path, model, lm, params = hf_llama
    out = tmp_path / "magnitude"
    assert main(["compress", "--model", str(path), "--method", "magnitude", "--sparsity", "0.6", "--out", str(out)]) == 0
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    down = pruned.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.mean(down == 0) == pytest.approx(0.6, abs=1 / down.size)
    ours = prune(lm, params, PruneSpec(method="magnitude", sparsity=0.6))
    np.testing.assert_array_equal(np.asarray(ours["blocks"]["mlp"]["down"]["kernel"][1]).T, down)
    tokens = ROWS[0][None]
    with torch.no_grad():
        theirs = pruned(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lm.apply(ours, tokens)), theirs, atol=1e-4)


def test_two_of_four_packing_equals_a_loop_and_unpacks_exactly():
    from jaxllm.compress.compact import PATTERNS, pack_two_of_four, unpack_two_of_four

    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 16, 3)).astype(np.float32)
    for l, g, o in np.ndindex(2, 4, 3):  # zero 2 (or, in some groups, 3 or 4) of every 4 inputs
        drop = rng.permutation(4)[: rng.choice([2, 2, 3, 4])]
        w[l, 4 * g + drop, o] = 0
    values, patterns = pack_two_of_four(w)
    assert values.shape == (2, 8, 3) and patterns.shape == (2, 4, 3) and patterns.dtype == np.uint8
    for l, g, o in np.ndindex(2, 4, 3):
        group = w[l, 4 * g:4 * g + 4, o]
        kept = sorted((list(np.flatnonzero(group)) + [i for i in range(4) if group[i] == 0])[:2])  # zeros fill in order
        assert PATTERNS[patterns[l, g, o]].tolist() == kept
        assert values[l, 2 * g:2 * g + 2, o].tolist() == group[kept].tolist()
    np.testing.assert_array_equal(unpack_two_of_four(values, patterns), w)


def test_compress_compact_2_of_4_is_smaller_and_loads_bitwise(hf_llama, tmp_path, capsys):
    from jaxllm.interop.models import load_model

    path, _, lm, params = hf_llama
    out = tmp_path / "compact"
    assert main(["compress", "--model", str(path), "--method", "magnitude", "--pattern", "2:4", "--compact",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "compact.json").read_text())
    assert len(meta["packed"]) == 7 * 1 and all(p.startswith("blocks.") for p in meta["packed"])  # 7 stacked maps
    want = prune(lm, params, PruneSpec(method="magnitude", pattern=(2, 4)))
    loaded = load_model(out)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    packed = sum(np.asarray(get_path(want, tuple(p.split(".")) + ("kernel",))).nbytes for p in meta["packed"])
    # the packed maps: half their values plus one byte per 4 weights (f32: 9/16 of their bytes)
    assert meta["bytes"] < meta["dense_bytes"] - packed * (1 - 9 / 16) + 4096  # + the safetensors header
    assert main(["convert", str(out), str(tmp_path / "hf")]) == 0  # what generate / eval load, as convert reads it
    down = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").model.layers[1].mlp.down_proj.weight
    np.testing.assert_array_equal(down.detach().numpy(), np.asarray(want["blocks"]["mlp"]["down"]["kernel"][1]).T)
    assert main(["compress", "--model", str(path), "--method", "magnitude", "--sparsity", "0.5", "--compact",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--pattern 2:4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- MaskLLM
def test_maskllm_soft_and_hard_masks_follow_the_formula():
    """The 6 candidates are the 2:4 patterns; the Gumbel-softmax mix equals numpy's formula with the same noise; the
    argmax pattern is valid 2:4; a prior's logits choose the prior's own 2:4 mask."""
    from jaxllm.compress.maskllm import PATTERNS_KF, hard_mask, logits_shape, prior_logits, soft_mask
    from jaxllm.peft.lora import Target

    patterns = np.asarray(PATTERNS_KF)
    assert patterns.shape == (6, 4) and (patterns.sum(1) == 2).all() and len({tuple(p) for p in patterns}) == 6
    t = Target(("blocks", "attn", "o"), 1, 2, (2, 4, 8, 12), ("layers", "heads", "head_dim", "embed"))  # [L, H, hd, D]
    logits = jax.random.normal(jax.random.key(0), logits_shape(t)) * 0.01
    assert logits.shape == (2, 4, 2, 12, 6)
    key, tau, scale = jax.random.key(1), 0.7, 100.0
    soft = np.asarray(soft_mask(t, logits, key, tau, scale))
    z = scale * np.asarray(logits, np.float64)
    log_p = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    y = np.exp((log_p + np.asarray(jax.random.gumbel(key, logits.shape))) / tau)
    y /= y.sum(-1, keepdims=True)
    want = np.zeros(t.shape)
    for l, h, g, d in np.ndindex(2, 4, 2, 12):  # group g of head h: head_dim entries 4g..4g+3 of output d
        want[l, h, 4 * g:4 * g + 4, d] = y[l, h, g, d] @ patterns
    np.testing.assert_allclose(soft, want, atol=1e-5)
    hard = np.asarray(hard_mask(t, logits))
    assert (hard.reshape(2, 4, 2, 4, 12).sum(3) == 2).all()
    w = np.random.default_rng(0).normal(size=t.shape)
    prior = np.asarray(n_of_m_keep(np.abs(w.reshape(2, 32, 12)[1]), 2, 4)).reshape(4, 8, 12)
    chosen = np.asarray(hard_mask(t, prior_logits(t, np.stack([prior, prior]), 3.0, 100.0)))
    np.testing.assert_array_equal(chosen[1], prior)


def test_maskllm_finetune_learns_2_of_4_masks_below_wanda_on_frozen_weights(base_and_data, tmp_path):
    """`jaxllm finetune finetune.method=maskllm` (Wanda prior): every final mask is 2:4, every kept weight is the
    base's bitwise, and the learned masks' loss is below the Wanda-2:4 starting point on the training data. The run
    loads after its data is gone (its calibration rows are recorded in the run directory)."""
    import shutil

    from jaxllm.data.pipeline import calibration_rows, load_corpus, make_batches
    from jaxllm.train.setup import load_run

    base, data = base_and_data
    run, moving = tmp_path / "maskllm", tmp_path / "data.jsonl"
    shutil.copy(data, moving)
    assert main(["finetune", "--base", str(base), "finetune.method=maskllm", f"data.source={moving}", "data.format=sft",
                 "data.seq_len=64", "train.batch_size=8", "train.eval_every=0", "train.steps=20",
                 "train.learning_rate=1e-2", "train.warmup_steps=0", "finetune.calibration.samples=8",
                 f"checkpoint.run_dir={run}", "checkpoint.async_save=false"]) == 0
    moving.unlink()
    cfg, lm, learned = load_run(run)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(data)))
    _, _, dense = load_run(base)
    targets = find_targets(lm, ("q", "k", "v", "o", "gate", "up", "down"), "test")
    for t in targets:
        w, w0 = (np.asarray(get_path(p, t.path + ("kernel",))).reshape(2, -1, 4, int(np.prod(t.out_shape)))
                 for p in (learned, dense))
        assert ((w != 0).sum(2) == 2).all()  # 2 of every 4 consecutive inputs of an output
        np.testing.assert_array_equal(w[w != 0], w0[w != 0])
    wanda = prune(lm, dense, PruneSpec(pattern=(2, 4), sequential=False),
                  list(calibration_rows(cfg.data, cfg.finetune.calibration)))
    corpus = load_corpus(cfg.data)
    batches = list(make_batches(corpus.train_docs, corpus.tokenizer, seq_len=64, batch_size=8, seed=0, repeat=False,
                                encode=corpus.encode))[:4]
    loss = jax.jit(lambda p, b: lm.loss(p, b)[0])
    mean = lambda p: np.mean([float(loss(p, b)) for b in batches])
    assert mean(learned) < mean(wanda) - 0.05


# ---------------------------------------------------------------------------------------------------------- SpQR
def np_spqr(w, U, spec):
    """SpQR's per-layer routine, as the module docstring states it, in numpy loops (f32): (codes, stat codes,
    outlier mask, dequantised)."""
    O, I = w.shape
    g, f32 = spec.group, np.float32
    W, Q, codes = w.astype(f32).copy(), np.zeros((O, I), f32), np.zeros((O, I))
    outliers, stat_codes = np.zeros((O, I), bool), np.zeros((2, O, I // g))

    def minmax(x, valid, bits):
        lo = np.array([r[v].min() if v.any() else 0 for r, v in zip(x, valid)], f32)
        hi = np.array([r[v].max() if v.any() else 0 for r, v in zip(x, valid)], f32)
        scale = (hi - lo) / f32(2 ** bits - 1)
        scale = np.where(scale > 0, scale, f32(1))
        return scale, np.round(-lo / scale)

    def stat(v):  # quantised to stat_bits in chunks of stat_group rows, chunk stats through f16
        codes_, deq = np.zeros(O), np.zeros(O, f32)
        for c in range(0, O, spec.stat_group):
            chunk = v[c:c + spec.stat_group][None]
            s, z = (a.astype(np.float16).astype(f32) for a in minmax(chunk, np.ones_like(chunk, bool), spec.stat_bits))
            codes_[c:c + spec.stat_group] = np.clip(np.round(chunk[0] / s + z), 0, 2 ** spec.stat_bits - 1)
            deq[c:c + spec.stat_group] = (codes_[c:c + spec.stat_group] - z) * s
        return codes_, deq

    for k in range(0, I, g):
        x, d = W[:, k:k + g], np.diag(U)[k:k + g]
        (_, s), (_, z) = (stat(a) for a in minmax(x, np.ones_like(x, bool), spec.bits))
        err = ((x - (np.clip(np.round(x / s[:, None] + z[:, None]), 0, 2 ** spec.bits - 1) - z[:, None]) * s[:, None])
               / d) ** 2
        order = np.argsort(-err.reshape(-1), kind="stable")[: int(spec.max_outlier_share * O * g)]
        out = np.zeros(O * g, bool)
        out[order] = err.reshape(-1)[order] > spec.outlier_threshold * err.mean()
        out = out.reshape(O, g)
        (sc, s), (zc, z) = (stat(a) for a in minmax(x, ~out, spec.bits))
        stat_codes[0][:, k // g], stat_codes[1][:, k // g], outliers[:, k:k + g] = sc, zc, out
        for j in range(k, k + g):
            codes[:, j] = np.clip(np.round(W[:, j] / s + z), 0, 2 ** spec.bits - 1)
            q = np.where(out[:, j - k], W[:, j], (codes[:, j] - z) * s)
            e = (W[:, j] - q) / U[j, j]
            W[:, j + 1:] -= np.outer(e, U[j, j + 1:])
            Q[:, j] = q
    Q[outliers] = Q[outliers].astype(np.float16)
    return codes, stat_codes, outliers, Q


def test_spqr_one_layer_equals_the_numpy_routine_and_its_stored_kernel_runs_in_dense(tmp_path):
    """Codes, stat codes and the outlier set of one layer equal the numpy loops' (given the same U, itself checked
    against numpy's inverse and Cholesky); outliers stay within their share; the stored kernel dequantises to the
    routine's values, runs inside `Dense`, and costs the bits it reports; SpQR's output error (under H) is below
    3-bit round-to-nearest's with the same groups."""
    from jaxllm.compress.spqr import SpqrSpec, inverse_hessian_factor, quantize_matrix, spqr_kernel

    rng = np.random.default_rng(0)
    O, I = 48, 64
    w = rng.normal(size=(O, I)).astype(np.float32)
    w[3, 5] = 8.0  # a large weight: its group's scale coarsens, errors grow
    x = (rng.normal(size=(200, I)) * rng.uniform(0.2, 3, I)).astype(np.float32)
    H = x.T @ x
    spec = SpqrSpec()
    U = np.asarray(inverse_hessian_factor(H, spec.damp))
    Hd = H.astype(np.float64) + spec.damp * np.mean(np.diag(H)) * np.eye(I)
    np.testing.assert_allclose(U, np.linalg.cholesky(np.linalg.inv(Hd)).T, rtol=1e-3, atol=1e-6)
    m = jax.jit(lambda w, h: quantize_matrix(w, h, spec))(w, H)
    codes, stat_codes, outliers, Q = np_spqr(w, U, spec)
    np.testing.assert_array_equal(np.asarray(m.outliers), outliers)
    np.testing.assert_array_equal(np.asarray(m.stored.codes), codes)
    np.testing.assert_array_equal(np.asarray(m.stored.scale_codes), stat_codes[0])
    np.testing.assert_array_equal(np.asarray(m.stored.zero_codes), stat_codes[1])
    np.testing.assert_allclose(np.asarray(m.dequantized), Q, atol=1e-5)
    assert 0 < outliers.mean() <= spec.max_outlier_share

    kernel = spqr_kernel([m], (I, O), ())
    np.testing.assert_array_equal(np.asarray(kernel.dequantize()).T, np.asarray(m.dequantized))
    stored_bits = sum(8 * np.asarray(a).itemsize * np.asarray(a).size for a in jax.tree.leaves(kernel))
    assert spec.bits_per_param(kernel.num_outliers, O * I) == pytest.approx(
        3 + 6 / 16 + 64 / 256 + 48 * outliers.sum() / (O * I))
    assert stored_bits > 0
    from flax import nnx

    from jaxllm.models.layers import Dense

    dense = Dense((I,), (O,), ("embed", "mlp"), use_bias=False, std=0.02, dtype=jnp.float32,
                  param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    dense.kernel.value = kernel
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x[:4]))), x[:4] @ np.asarray(m.dequantized).T, rtol=1e-5,
                               atol=1e-4)
    h_err = lambda q: float(np.trace((q - w) @ H @ (q - w).T))
    rtn = np.zeros_like(w)
    for k in range(0, I, 16):
        lo, hi = w[:, k:k + 16].min(1, keepdims=True), w[:, k:k + 16].max(1, keepdims=True)
        s, z = (hi - lo) / 7, np.round(-lo / ((hi - lo) / 7))
        rtn[:, k:k + 16] = (np.clip(np.round(w[:, k:k + 16] / s + z), 0, 7) - z) * s
    assert h_err(Q) < 0.9 * h_err(rtn)


def test_spqr_model_runs_its_kernels_in_the_layer_scan_and_reports_its_bits(hf_llama):
    from jaxllm.compress.quantize import dequantized, spqr
    from jaxllm.compress.spqr import SpqrKernel, SpqrSpec

    _, _, lm, params = hf_llama
    quantized, report = spqr(lm, params, SpqrSpec(), ROWS, targets=("q", "down"))
    assert isinstance(quantized["blocks"]["mlp"]["down"]["kernel"], SpqrKernel)
    dense = dequantized(quantized)
    tokens = ROWS[0][None]
    np.testing.assert_allclose(np.asarray(jax.jit(lm.apply)(quantized, tokens)), np.asarray(lm.apply(dense, tokens)),
                               atol=1e-5)
    assert 3.6 < report["bits_per_param"] < 3.65 + 48 * 0.01 and 0 < report["outlier_share"] <= 0.01
    error = np.abs(np.asarray(lm.apply(dense, tokens)) - np.asarray(lm.apply(params, tokens))).max()
    assert 0 < error < 1.0
    with pytest.raises(ConfigError, match="SpQR needs calibration"):
        spqr(lm, params, SpqrSpec(), [])
    with pytest.raises(ConfigError, match="divisible by group=24"):
        spqr(lm, params, SpqrSpec(group=24), ROWS)
