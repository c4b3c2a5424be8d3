"""LoRA / PiSSA / DoRA / SORSA / MiSS (Bone, Bat) / ABBA (as LoHa) / CorDA against Hugging Face `peft` (torch, CPU) on a tiny random Llama: the same adapter
weights give the same logits in both, in both directions of the adapter export/import. Bottleneck adapters (which peft
does not have) against transformers' Llama with the adapter formula added by forward hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed

torch = pytest.importorskip("torch", reason="peft parity needs the [hf] extra")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxllm.config import ConfigError, LoraConfig  # noqa: E402
from jaxllm.interop.hf_checkpoint import load_hf_checkpoint  # noqa: E402
from jaxllm.interop.peft_adapter import load_peft_adapter, save_peft_adapter  # noqa: E402
from jaxllm.peft import LoraAdapter  # noqa: E402
from jaxllm.peft.abba import AbbaAdapter  # noqa: E402
from jaxllm.peft.corda import CordaAdapter  # noqa: E402
from jaxllm.peft.miss import MissAdapter  # noqa: E402
from jaxllm.peft.sorsa import SorsaAdapter  # noqa: E402

TOL = 1e-4  # max abs logit difference, f32
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {  # name -> (peft LoraConfig kwargs, jaxllm LoraConfig kwargs)
    "lora": (dict(), dict()),
    "rslora": (dict(use_rslora=True), dict(rslora=True)),
    "pissa": (dict(init_lora_weights="pissa"), dict(init="pissa")),
    "dora": (dict(use_dora=True), dict(dora=True)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path, safe_serialization=True)
    lm, params, model_type = load_hf_checkpoint(path)
    return path, lm, params, model_type


def _tokens():
    return np.random.default_rng(0).integers(0, 97, size=(2, 10))


def _torch_base(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return model


def _peft_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.numpy()


def _trained_in_peft(model, marker: str, seed: int):
    """A peft model as after some training: every adapter tensor (name containing `marker`) moved; in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_jaxllm_adapter_exported_to_peft(method, base, tmp_path):
    path, lm, params, model_type = base
    spec = LoraConfig(rank=4, alpha=8.0, **METHODS[method][1])
    adapter = LoraAdapter(lm, spec)
    initial, frozen = adapter.init(jax.random.key(1), params)
    trained = perturbed(initial, 2)
    ours = np.asarray(lm.apply(adapter.apply(frozen, trained), _tokens()))

    save_peft_adapter(tmp_path / "adapter", adapter, trained, model_type, initial=initial)
    model = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path / "adapter").eval()
    theirs = _peft_logits(model, _tokens())
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    assert np.abs(ours - np.asarray(lm.apply(params, _tokens()))).max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_adapter_imported_into_jaxllm(method, base, tmp_path):
    path, lm, params, model_type = base
    torch.manual_seed(3)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS_HF, **METHODS[method][0])
    model = peft.get_peft_model(_torch_base(path), peft_cfg)
    if method == "pissa":  # keep the initial adapter: peft converts PiSSA to LoRA on the original base
        model.save_pretrained(tmp_path / "initial")
    model = _trained_in_peft(model, "lora_", 3)
    theirs = _peft_logits(model, _tokens())
    if method == "pissa":
        model.save_pretrained(tmp_path / "adapter", path_initial_model_for_weight_conversion=tmp_path / "initial")
    else:
        model.save_pretrained(tmp_path / "adapter")

    adapter, lora = load_peft_adapter(tmp_path / "adapter", lm, model_type)
    assert adapter.spec.rank == (8 if method == "pissa" else 4)
    ours = np.asarray(lm.apply(adapter.apply(params, jax.tree.map(jnp.asarray, lora)), _tokens()))
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_sorsa_adapter_exported_to_peft_as_a_lora_on_the_original_base(base, tmp_path):
    """SORSA trains against a residual base; exported (s folded into A, minus the initial adapter, rank 2r), peft puts
    it on the original base and computes what jaxllm does."""
    path, lm, params, model_type = base
    adapter = SorsaAdapter(lm, LoraConfig(rank=4))
    initial, frozen = adapter.init(jax.random.key(1), params)
    trained = perturbed(initial, 2)
    ours = np.asarray(lm.apply(adapter.apply(frozen, trained), _tokens()))
    save_peft_adapter(tmp_path / "adapter", adapter, adapter.as_lora(trained), model_type,
                      initial=adapter.as_lora(initial))
    model = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path / "adapter").eval()
    np.testing.assert_allclose(ours, _peft_logits(model, _tokens()), atol=TOL, rtol=0)
    assert np.abs(ours - np.asarray(lm.apply(params, _tokens()))).max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("bat", [False, True], ids=["bone", "bat"])
def test_miss_adapters_against_peft_both_ways_and_merge_unmerge(bat, base, tmp_path):
    """Bone and Bat (peft's MiSS, `init_weights=True | "bat"`): zero blocks are the base; peft's trained blocks
    imported, and ours exported, give the same logits in both; merging keeps the function and unmerging restores
    the base (bitwise with the record)."""
    path, lm, params, model_type = base
    init = "bat" if bat else True
    model = peft.get_peft_model(_torch_base(path), peft.MissConfig(r=4, init_weights=init, target_modules=TARGETS_HF))
    model = _trained_in_peft(model, "miss_block", 4)
    theirs = _peft_logits(model, _tokens())
    model.save_pretrained(tmp_path / "theirs")
    adapter, blocks = load_peft_adapter(tmp_path / "theirs", lm, model_type)
    assert isinstance(adapter, MissAdapter) and adapter.bat == bat
    blocks = jax.tree.map(jnp.asarray, blocks)
    ours = np.asarray(lm.apply(adapter.apply(params, blocks), _tokens()))
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    assert np.abs(ours - np.asarray(lm.apply(params, _tokens()))).max() > 1e-2  # the adapter matters

    ours_adapter = MissAdapter(lm, LoraConfig(rank=4), bat=bat)
    zeros, frozen = ours_adapter.init(jax.random.key(0), params)
    np.testing.assert_allclose(lm.apply(ours_adapter.apply(frozen, zeros), _tokens()), lm.apply(params, _tokens()),
                               atol=1e-5)
    trained = perturbed(zeros, 5)
    mine = np.asarray(lm.apply(ours_adapter.apply(frozen, trained), _tokens()))
    save_peft_adapter(tmp_path / "ours", ours_adapter, trained, model_type)
    loaded = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(mine, _peft_logits(loaded, _tokens()), atol=TOL, rtol=0)

    merged, record = ours_adapter.merge_reversibly(frozen, trained)
    np.testing.assert_allclose(lm.apply(merged, _tokens()), mine, atol=TOL)
    with torch.no_grad():
        peft_merged = loaded.merge_and_unload().state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    np.testing.assert_allclose(np.asarray(merged["blocks"]["mlp"]["down"]["kernel"][1]).T, peft_merged, atol=1e-5)
    back = ours_adapter.unmerge(merged, trained)
    for name, x in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_allclose(np.asarray(_get(back, name)), np.asarray(x), atol=1e-5)
    exact = ours_adapter.unmerge(merged, trained, record)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(params)))


@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_bottleneck_adapters_against_transformers_with_the_formula_hooked_in(placement, base):
    """Adapters on attention and MLP: fresh ones compute the base (within 1e-5); moved ones give the logits of
    transformers' model whose attention and MLP outputs y get + relu(u Wd + bd) Wu + bu by forward hooks (u = y in
    series, the sublayer's normed input in parallel)."""
    import dataclasses

    from jaxllm.config import BottleneckConfig
    from jaxllm.language_model import LanguageModel
    from jaxllm.train.methods.added_modules import join, overlay, split_added

    path, lm, params, _ = base
    spec = BottleneckConfig(width=8, placement=placement, sublayers=["attn", "mlp"], scale=0.5)
    grown = LanguageModel(dataclasses.replace(lm.cfg, bottleneck=spec))
    fresh = overlay(grown.init(jax.random.key(0)), params)
    np.testing.assert_allclose(grown.apply(fresh, _tokens()), lm.apply(params, _tokens()), atol=1e-5, rtol=0)
    adapters, frozen = split_added(fresh, params)
    moved = join(perturbed(adapters, 6), frozen)
    ours = np.asarray(grown.apply(moved, _tokens()))

    model = _torch_base(path)
    blocks = moved["blocks"]
    tensor = lambda x: torch.tensor(np.asarray(x))

    def hook(i, sublayer):
        a = blocks[f"{sublayer}_adapter"]
        Wd, bd, Wu, bu = (tensor(a[m][k][i]) for m in ("down", "up") for k in ("kernel", "bias"))

        def add_adapter(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            u = y if placement == "series" else kwargs.get("hidden_states", args[0] if args else None)
            y = y + 0.5 * (torch.relu(u @ Wd + bd) @ Wu + bu)
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return add_adapter

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(hook(i, "attn"), with_kwargs=True)
        layer.mlp.register_forward_hook(hook(i, "mlp"), with_kwargs=True)
    np.testing.assert_allclose(ours, _peft_logits(model, _tokens()), atol=TOL, rtol=0)
    assert np.abs(ours - np.asarray(lm.apply(params, _tokens()))).max() > 1e-2  # the adapters matter


def test_abba_against_peft_loha_both_ways_and_its_init(base, tmp_path):
    """ABBA's update s (A1 B1) * (A2 B2), run through its Khatri-Rao factors, equals peft's LoHa (which forms the
    product) with the same factors, in both directions; at init A1 B1 is W's principal rank-r part (numpy's SVD) and
    the model is the base; merging keeps the function and unmerging restores the base."""
    path, lm, params, model_type = base
    adapter = AbbaAdapter(lm, LoraConfig(rank=4, alpha=8.0))
    initial, frozen = adapter.init(jax.random.key(1), params)
    np.testing.assert_allclose(lm.apply(adapter.apply(frozen, initial), _tokens()), lm.apply(params, _tokens()), atol=1e-5)
    w = np.asarray(params["blocks"]["mlp"]["down"]["kernel"][1], np.float64)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    leaves = {k: np.asarray(v[1], np.float64) for k, v in initial["blocks"]["mlp"]["down"].items()}
    np.testing.assert_allclose(leaves["a1"] @ leaves["b1"], u[:, :4] * sv[:4] @ vt[:4], atol=1e-5)
    trained = perturbed(initial, 2)
    ours = np.asarray(lm.apply(adapter.apply(frozen, trained), _tokens()))
    save_peft_adapter(tmp_path / "ours", adapter, trained, model_type)
    loaded = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(ours, _peft_logits(loaded, _tokens()), atol=TOL, rtol=0)
    assert np.abs(ours - np.asarray(lm.apply(params, _tokens()))).max() > 10 * TOL  # the adapter matters
    merged = adapter.merge(frozen, trained)
    np.testing.assert_allclose(lm.apply(merged, _tokens()), ours, atol=TOL)
    back = adapter.unmerge(merged, trained)
    np.testing.assert_allclose(back["blocks"]["attn"]["q"]["kernel"], params["blocks"]["attn"]["q"]["kernel"], atol=1e-5)

    model = peft.get_peft_model(_torch_base(path), peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS_HF))
    model = _trained_in_peft(model, "hada_", 5)
    model.save_pretrained(tmp_path / "theirs")
    imported, tree = load_peft_adapter(tmp_path / "theirs", lm, model_type)
    assert isinstance(imported, AbbaAdapter) and imported.scale == 2.0
    np.testing.assert_allclose(lm.apply(imported.apply(params, jax.tree.map(jnp.asarray, tree)), _tokens()),
                               _peft_logits(model, _tokens()), atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft_on_the_same_calibration_samples(mode, base, tmp_path):
    """CorDA from jaxllm's calibration pass (input covariances through the probe's gradient) builds the adapter and
    residual peft builds from its forward hooks on the same samples (compared sign-free: s A B and the residual);
    the model starts as the base, and the trained adapter exports as a LoRA peft puts on the original base."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    path, lm, params, model_type = base
    samples = [np.random.default_rng(10 + i).integers(0, 97, 12) for i in range(3)]
    model = _torch_base(path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS_HF, init_lora_weights="corda",
                          corda_config=CordaConfig(corda_method=mode))
    with torch.no_grad():
        preprocess_corda(model, cfg, run_model=lambda: [model(input_ids=torch.tensor(s)[None]) for s in samples])
    model = peft.get_peft_model(model, cfg)

    adapter = CordaAdapter(lm, LoraConfig(rank=4, alpha=8.0), mode)
    assert adapter.calibrate(params, samples) == 3
    lora, frozen = adapter.init(jax.random.key(0), params)
    layers = model.base_model.model.model.layers
    for t in adapter.targets:
        hf = getattr(layers[1].self_attn if t.path[1] == "attn" else layers[1].mlp, f"{t.path[2]}_proj")
        theirs_delta = (2.0 * hf.lora_B["default"].weight @ hf.lora_A["default"].weight).detach().numpy().T
        a, b = (np.asarray(lora["blocks"][t.path[1]][t.path[2]][k][1]) for k in "ab")
        ours_delta = 2.0 * a.reshape(-1, 4) @ b.reshape(4, -1)
        np.testing.assert_allclose(ours_delta, theirs_delta, atol=1e-4, err_msg=t.name)
        residual = np.asarray(frozen["blocks"][t.path[1]][t.path[2]]["kernel"][1]).reshape(ours_delta.shape)
        np.testing.assert_allclose(residual, hf.base_layer.weight.detach().numpy().T, atol=1e-4, err_msg=t.name)
    np.testing.assert_allclose(lm.apply(adapter.apply(frozen, lora), _tokens()), lm.apply(params, _tokens()), atol=1e-5)

    trained = perturbed(lora, 2)
    ours = np.asarray(lm.apply(adapter.apply(frozen, trained), _tokens()))
    save_peft_adapter(tmp_path / "adapter", adapter, trained, model_type, initial=lora)
    loaded = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path / "adapter").eval()
    np.testing.assert_allclose(ours, _peft_logits(loaded, _tokens()), atol=TOL, rtol=0)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_pissa_init_matches_peft(base):
    """Our PiSSA init takes the same principal part of W as peft's (compared sign-free: s A B and the residual)."""
    path, lm, params, _ = base
    model = peft.get_peft_model(_torch_base(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa"))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    theirs_delta = (2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
    theirs_residual = layer.base_layer.weight.detach().numpy().T

    adapter = LoraAdapter(lm, LoraConfig(targets=["q"], rank=4, alpha=8.0, init="pissa"))
    lora, frozen = adapter.init(jax.random.key(0), params)
    a, b = np.asarray(lora["blocks"]["attn"]["q"]["a"][1]), np.asarray(lora["blocks"]["attn"]["q"]["b"][1])
    ours_delta = 2.0 * a.reshape(32, 4) @ b.reshape(4, 32)
    np.testing.assert_allclose(ours_delta, theirs_delta, atol=1e-5)
    np.testing.assert_allclose(np.asarray(frozen["blocks"]["attn"]["q"]["kernel"][1]).reshape(32, 32),
                               theirs_residual, atol=1e-5)


def test_malformed_peft_adapters_are_clear_errors(base, tmp_path):
    path, lm, params, model_type = base
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path / "empty", lm, model_type)

    model = peft.get_peft_model(_torch_base(path), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_peft_adapter(tmp_path / "ok", lm, model_type)

    model = peft.get_peft_model(_torch_base(path), peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    model.save_pretrained(tmp_path / "bias")
    with pytest.raises(ConfigError, match="trained biases"):
        load_peft_adapter(tmp_path / "bias", lm, model_type)

    adapter = LoraAdapter(lm, LoraConfig(rank=2, init="pissa"))
    lora, _ = adapter.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="pass `initial`"):
        save_peft_adapter(tmp_path / "x", adapter, lora, model_type)


def test_finetune_a_hf_checkpoint_and_load_the_adapter_in_peft(tmp_path):
    """`jaxllm finetune --base HF_DIR` end to end: the adapter it writes, loaded by peft onto the same HF
    checkpoint, gives the logits of jaxllm's merged fine-tuned model."""
    import json

    from jaxllm.cli import main
    from jaxllm.data.synthetic import generate_instructions
    from jaxllm.interop.models import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    data = tmp_path / "chain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_instructions(32)))
    run = tmp_path / "run"
    assert main(["finetune", "--base", str(tmp_path / "hf"), "--config", "finetune/lora", f"data.source={data}",
                 "data.seq_len=64", "train.steps=3", "train.warmup_steps=1", "train.eval_every=0",
                 "finetune.lora.init=pissa", "finetune.lora.dora=true", f"checkpoint.run_dir={run}"]) == 0
    merged = load_model(run)
    model = peft.PeftModel.from_pretrained(_torch_base(tmp_path / "hf"), run / "adapter").eval()
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(merged.lm.apply(merged.params, tokens)), _peft_logits(model, tokens),
                               atol=TOL, rtol=0)
