"""Hugging Face interop against `transformers` (torch, CPU) on tiny random-init models, one per family:
import a saved checkpoint directory, logit parity with padding, greedy generation token for token,
export that transformers loads back, and a lossless round trip."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity needs the [hf] extra")
transformers = pytest.importorskip("transformers")

from jaxllm.config import ConfigError  # noqa: E402
from jaxllm.generate import generate  # noqa: E402
from jaxllm.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from jaxllm.interop.hf_mapping import config_from_hf, params_from_hf  # noqa: E402
from jaxllm.language_model import LanguageModel  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0),
    "llama3_scaled_rope": lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_yarn_rope": lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 8.0,
                                   "beta_slow": 1.0, "original_max_position_embeddings": 16}),
    "llama_linear_rope": lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                     shared_expert_intermediate_size=40),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
TOL = 1e-4  # max abs logit difference, f32


def _hf_model(family):
    torch.manual_seed(0)
    hf_cfg = FAMILIES[family]()
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so their mapping is checked too
        for name, p in model.named_parameters():
            router = name.endswith("mlp.gate.weight") or "shared_expert_gate" in name  # MoE routers: clear choices
            if name.endswith("bias") or "norm" in name or "ln_" in name or router:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch():
    T = 12
    tokens = np.random.default_rng(0).integers(3, 97, size=(2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, :4] = 0  # left padding in the second row
    return tokens, mask, np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


# linear and llama3 rope scaling are read by the logits test below; their export round trips run in the slow set
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("llama_linear_rope", "llama3_scaled_rope")
                                    else f for f in sorted(FAMILIES)])
def test_import_generate_export_round_trip(family, tmp_path):
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    lm, params, model_type = load_hf_checkpoint(tmp_path / "hf")
    assert model_type == model.config.model_type

    # logits on a padded batch
    tokens, mask, positions = _batch()
    real = mask.astype(bool)
    ref = _hf_logits(model, tokens, mask, positions)
    out = np.asarray(jax.jit(lm.apply)(params, tokens, positions, mask))
    assert np.max(np.abs(out[real] - ref[real])) < TOL

    # greedy generation of 20 tokens, batched prompts of different lengths
    prompts = [list(tokens[0, :9]), list(tokens[1, 4:9])]
    with torch.no_grad():
        hf_out = model.generate(input_ids=torch.tensor(tokens[:, :9]), attention_mask=torch.tensor(mask[:, :9]),
                                max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generate(lm, params, prompts, 20) == hf_out[:, 9:].tolist()

    # export: transformers loads it and matches; re-import is lossless
    save_hf_checkpoint(tmp_path / "out", lm.cfg, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert np.max(np.abs(_hf_logits(back, tokens, mask, positions)[real] - ref[real])) < TOL
    _, params2, _ = load_hf_checkpoint(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("family", ["llama", "llama3_scaled_rope", "llama_yarn_rope", "llama_linear_rope"])
def test_sharp_attention_parity_would_catch_a_wrong_rotation(family, tmp_path):
    """At std-0.02 init attention is nearly uniform: a RoPE mistake moves logits by ~1e-3, close to TOL. With q/k
    scaled to std 0.5 attention is sharp: the import still matches within TOL, while a copy of the mapping with
    one sign flipped (the second half of every q/k head negated: the rotation runs backwards) and, for the scaled
    ropes (llama3, yarn, linear), the same checkpoint read without its rope scaling, both miss by over 100 x TOL."""
    import dataclasses

    from jaxllm.config import RopeScalingConfig

    model = _hf_model(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25.0)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    lm, params, _ = load_hf_checkpoint(tmp_path / "hf")
    tokens, mask, positions = _batch()
    real = mask.astype(bool)
    ref = _hf_logits(model, tokens, mask, positions)[real]
    miss = lambda lm, params: float(np.max(np.abs(np.asarray(lm.apply(params, tokens, positions, mask))[real] - ref)))
    assert miss(lm, params) < TOL

    attn = params["blocks"]["attn"]
    half = attn["q"]["kernel"].shape[-1] // 2
    flip = lambda w: w.at[..., half:].multiply(-1)  # kernels [layers, D, heads, head_dim]
    flipped = {**params, "blocks": {**params["blocks"], "attn": {
        **attn, "q": {"kernel": flip(attn["q"]["kernel"])}, "k": {"kernel": flip(attn["k"]["kernel"])}}}}
    assert miss(lm, flipped) > 100 * TOL
    if family != "llama":  # the same checkpoint read without its rope scaling
        unscaled = LanguageModel(dataclasses.replace(lm.cfg, rope_scaling=RopeScalingConfig()))
        assert miss(unscaled, params) > 100 * TOL


def test_sharded_import_places_params_on_the_mesh(tmp_path):
    from jaxllm.config import MeshConfig
    from jaxllm.sharding import make_mesh

    _hf_model("llama").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()  # a sharded checkpoint
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))  # vocab 97 would not split over tensor
    lm, params, _ = load_hf_checkpoint(tmp_path, mesh=mesh)
    q = params["blocks"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert q.addressable_shards[0].data.shape == (2, 32 // 8, 4, 8)
    _, local, _ = load_hf_checkpoint(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, local)


def test_malformed_checkpoints_are_clear_errors(tmp_path):
    model = _hf_model("llama")
    model.save_pretrained(tmp_path / "ok", safe_serialization=True)
    # no weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"no weights \(\*.safetensors"):
        load_hf_checkpoint(tmp_path / "empty")
    # only a pickle: refused, never opened
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ConfigError, match=r"only pickled weights \['pytorch_model.bin'\]; jaxllm never unpickles"):
        load_hf_checkpoint(tmp_path / "empty")
    # truncated safetensors
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"model.safetensors: not a readable safetensors file .*truncated"):
        load_hf_checkpoint(tmp_path / "ok")
    # unsupported architecture, missing config
    cfg = json.loads((tmp_path / "empty" / "config.json").read_text()) | {"model_type": "bert"}
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not supported; supported: \['llama'"):
        load_hf_checkpoint(tmp_path / "empty")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=r"no config.json"):
        load_hf_checkpoint(tmp_path / "nothing")


def test_missing_and_unexpected_tensors_are_listed():
    hf_cfg = FAMILIES["llama"]()
    cfg = config_from_hf(hf_cfg.to_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.extra.weight"] = np.zeros(3)
    with pytest.raises(ConfigError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], unexpected \['model.extra.weight'\]"):
        params_from_hf(cfg, "llama", state, LanguageModel(cfg).param_shapes)


def test_tokenizer_and_chat_template_come_from_the_directory_and_are_exported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxllm.interop.models import convert, load_model

    _hf_model("llama").save_pretrained(tmp_path / "hf", safe_serialization=True)
    vocab = {"<s>": 1, "</s>": 2, "<unk>": 0} | {c: i + 3 for i, c in enumerate("abcdefghij")}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    loaded = load_model(tmp_path / "hf")
    assert loaded.tokenizer.encode("abc") == [3, 4, 5] and loaded.tokenizer.bos_id == 1
    assert loaded.tokenizer.chat_template == template
    convert(tmp_path / "hf", tmp_path / "run")  # HF -> jaxllm run -> HF keeps the tokenizer files
    convert(tmp_path / "run", tmp_path / "back")
    assert load_model(tmp_path / "back").tokenizer.chat_template == template
