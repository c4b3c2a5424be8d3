"""Logit parity with Hugging Face `transformers` (torch, CPU) on tiny random-init models, one per family."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity needs the [hf] extra")
transformers = pytest.importorskip("transformers")

from jaxllm.config import ConfigError  # noqa: E402
from jaxllm.interop.hf_mapping import config_from_hf, params_from_hf  # noqa: E402
from jaxllm.language_model import LanguageModel  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0),
    "llama3_scaled_rope": lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
TOL = 1e-4  # max abs logit difference, f32


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_with_left_padding(family):
    torch.manual_seed(0)
    hf_cfg = FAMILIES[family]()
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so their mapping is checked too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = config_from_hf(hf_cfg.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(cfg, hf_cfg.model_type, state)
    lm = LanguageModel(cfg)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, lm.param_shapes)

    T = 12
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, :4] = 0  # left padding in the second row
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    out = np.asarray(jax.jit(lm.apply)(params, tokens, positions, mask))
    real = mask.astype(bool)
    err = np.max(np.abs(out[real] - ref[real]))
    assert err < TOL, f"{family}: max abs logit diff {err:.2e}"


def test_unsupported_and_mismatched_checkpoints_are_clear_errors():
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not supported; supported: \['llama'"):
        config_from_hf({"model_type": "bert"})
    hf_cfg = FAMILIES["llama"]()
    cfg = config_from_hf(hf_cfg.to_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.extra.weight"] = np.zeros(3)
    with pytest.raises(ConfigError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], unexpected \['model.extra.weight'\]"):
        params_from_hf(cfg, "llama", state)
