"""Map Hugging Face causal-LM configs and state dicts (Llama, Mistral, Qwen2/3, GPT-2) to jaxllm.

`config_from_hf(config_dict) -> ModelConfig`; `params_from_hf(cfg, model_type, tensors) -> params`.
Tensors are numpy arrays keyed by HF names (from safetensors or a torch state dict converted by the
caller); nothing here unpickles anything. What cannot be represented is a `ConfigError`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from jaxllm.config import AttentionConfig, ConfigError, MlpConfig, ModelConfig, RopeScalingConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_LIKE + ("gpt2",)
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _activation(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ConfigError(f"HF hidden_act {name!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[name]


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScalingConfig]:
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind == "llama3":
        return theta, RopeScalingConfig(
            type="llama3", factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_seq_len=scaling["original_max_position_embeddings"],
        )
    raise ConfigError(f"HF rope type {kind!r} is not supported; supported: ['default', 'llama3']")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """A jaxllm ModelConfig equivalent to a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"HF model_type {model_type!r} is not supported; supported: {list(SUPPORTED)}")
    if model_type == "gpt2":
        d = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
            num_kv_heads=hf["n_head"], max_seq_len=hf["n_positions"], norm="layernorm",
            norm_eps=hf["layer_norm_epsilon"], position="learned", bias="all", tie_embeddings=True,
            mlp=MlpConfig(d_ff=hf.get("n_inner") or 4 * d, activation=_activation(hf["activation_function"]), gated=False),
        )
    if hf.get("mlp_bias"):
        raise ConfigError("HF mlp_bias=True is not supported for Llama-like models")
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        raise ConfigError("HF attention_bias=True (bias on q, k, v and o) is not supported")
    theta, scaling = _rope(hf)
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError("HF use_sliding_window=True (per-layer windows) is not supported for Qwen models")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), max_seq_len=hf["max_position_embeddings"], norm="rmsnorm",
        norm_eps=hf["rms_norm_eps"], position="rope", rope_theta=theta, rope_scaling=scaling,
        bias="qkv" if model_type == "qwen2" else "none",
        attention=AttentionConfig(sliding_window=window, qk_norm=model_type == "qwen3"),
        mlp=MlpConfig(d_ff=hf["intermediate_size"], activation=_activation(hf["hidden_act"]), gated=True),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _llama_layer(cfg: ModelConfig, get: Callable[[str], np.ndarray], i: int) -> dict[str, Any]:
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    p = f"model.layers.{i}."
    attn: dict[str, Any] = {
        "q": {"kernel": get(p + "self_attn.q_proj.weight").T.reshape(D, N, H)},
        "k": {"kernel": get(p + "self_attn.k_proj.weight").T.reshape(D, K, H)},
        "v": {"kernel": get(p + "self_attn.v_proj.weight").T.reshape(D, K, H)},
        "o": {"kernel": get(p + "self_attn.o_proj.weight").T.reshape(N, H, D)},
    }
    if cfg.bias == "qkv":
        for name, heads in (("q", N), ("k", K), ("v", K)):
            attn[name]["bias"] = get(p + f"self_attn.{name}_proj.bias").reshape(heads, H)
    if cfg.attention.qk_norm:
        attn["q_norm"] = {"scale": get(p + "self_attn.q_norm.weight")}
        attn["k_norm"] = {"scale": get(p + "self_attn.k_norm.weight")}
    return {
        "attn_norm": {"scale": get(p + "input_layernorm.weight")},
        "attn": attn,
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
        "mlp": {name: {"kernel": get(p + f"mlp.{name}_proj.weight").T} for name in ("gate", "up", "down")},
    }


def _gpt2_layer(cfg: ModelConfig, get: Callable[[str], np.ndarray], i: int) -> dict[str, Any]:
    D, N, H = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    p = f"transformer.h.{i}."
    qkv_w = np.split(get(p + "attn.c_attn.weight"), 3, axis=1)  # Conv1D: [in, out]
    qkv_b = np.split(get(p + "attn.c_attn.bias"), 3)
    attn = {name: {"kernel": w.reshape(D, N, H), "bias": b.reshape(N, H)} for name, w, b in zip("qkv", qkv_w, qkv_b)}
    attn["o"] = {"kernel": get(p + "attn.c_proj.weight").reshape(N, H, D), "bias": get(p + "attn.c_proj.bias")}
    ln = lambda name: {"scale": get(p + f"{name}.weight"), "bias": get(p + f"{name}.bias")}
    return {
        "attn_norm": ln("ln_1"),
        "attn": attn,
        "mlp_norm": ln("ln_2"),
        "mlp": {
            "up": {"kernel": get(p + "mlp.c_fc.weight"), "bias": get(p + "mlp.c_fc.bias")},
            "down": {"kernel": get(p + "mlp.c_proj.weight"), "bias": get(p + "mlp.c_proj.bias")},
        },
    }


def params_from_hf(cfg: ModelConfig, model_type: str, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """jaxllm params (layers stacked) from HF-named tensors. Missing or unexpected names are an error
    listing them; a tied `lm_head.weight` must equal the embedding table."""
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            missing.append(name)
            return np.zeros((0,))
        used.add(name)
        return np.asarray(tensors[name])

    missing: list[str] = []
    layer_fn = _gpt2_layer if model_type == "gpt2" else _llama_layer
    layers = [layer_fn(cfg, get, i) for i in range(cfg.num_layers)]
    if model_type == "gpt2":
        params: dict[str, Any] = {
            "embed": {"embedding": get("transformer.wte.weight")},
            "pos_embed": {"embedding": get("transformer.wpe.weight")},
            "final_norm": {"scale": get("transformer.ln_f.weight"), "bias": get("transformer.ln_f.bias")},
        }
    else:
        params = {"embed": {"embedding": get("model.embed_tokens.weight")}, "final_norm": {"scale": get("model.norm.weight")}}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    elif "lm_head.weight" in tensors:
        used.add("lm_head.weight")
        if not missing and not np.array_equal(tensors["lm_head.weight"], params["embed"]["embedding"]):
            raise ConfigError("tie_word_embeddings is set but lm_head.weight differs from the embedding table")
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        raise ConfigError(f"HF checkpoint does not match the {model_type} layout: missing {missing}, unexpected {unexpected}")
    params["blocks"] = _stack(layers)
    return params


def _stack(layers: list[dict[str, Any]]) -> dict[str, Any]:
    first = layers[0]
    if isinstance(first, dict):
        return {k: _stack([layer[k] for layer in layers]) for k in first}
    return np.stack(layers)
