"""Map Hugging Face causal-LM configs and state dicts (Llama, Mistral, Mixtral, Qwen2/3, Qwen2-MoE, GPT-2)
to jaxllm.

One table per family (`_entries`) drives both directions: `params_from_hf` and `params_to_hf`, with
`config_from_hf` / `config_to_hf` for `config.json`. Tensors are numpy arrays keyed by HF names; nothing
here unpickles anything. What cannot be represented is a `ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from jaxllm.config import AttentionConfig, ConfigError, MlpConfig, ModelConfig, MoeConfig, RopeScalingConfig
from jaxllm.nested import get_path, set_path

LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3")
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
    if kind == "linear":
        return theta, RopeScalingConfig(type="linear", factor=scaling["factor"])
    if kind == "yarn":
        original = scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        factor = scaling.get("factor") or hf["max_position_embeddings"] / original
        attention = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and factor > 1:  # DeepSeek's form of the same factor
            attention = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
        return theta, RopeScalingConfig(
            type="yarn", factor=factor, original_max_seq_len=original, beta_fast=scaling.get("beta_fast") or 32.0,
            beta_slow=scaling.get("beta_slow") or 1.0, attention_factor=attention, truncate=scaling.get("truncate", True))
    raise ConfigError(f"HF rope type {kind!r} is not supported; supported: ['default', 'llama3', 'linear', 'yarn'] "
                      "('dynamic' rescales with each call's length, which a compiled model does not see)")


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
    window = hf.get("sliding_window") if model_type in ("mistral", "mixtral") else None
    moe = MoeConfig()
    if model_type == "mixtral":  # HF's aux loss is top_k x ours (it counts assignments per choice)
        k = hf["num_experts_per_tok"]
        moe = MoeConfig(num_experts=hf["num_local_experts"], top_k=k, router_z_loss=0.0,
                        load_balance_loss=hf.get("router_aux_loss_coef", 0.001) * k)
    if model_type == "qwen2_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ConfigError("Qwen2-MoE with dense layers (decoder_sparse_step > 1 or mlp_only_layers) is not supported")
        k, shared = hf["num_experts_per_tok"], hf.get("shared_expert_intermediate_size") or 0
        moe = MoeConfig(num_experts=hf["num_experts"], top_k=k, d_ff=hf["moe_intermediate_size"], router_z_loss=0.0,
                        load_balance_loss=hf.get("router_aux_loss_coef", 0.001) * k,
                        normalize_top_k=bool(hf.get("norm_topk_prob", False)), shared_experts=1 if shared else 0,
                        shared_d_ff=shared or None, shared_gate=bool(shared))
    if model_type in ("qwen2", "qwen2_moe", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError("HF use_sliding_window=True (per-layer windows) is not supported for Qwen models")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), max_seq_len=hf["max_position_embeddings"], norm="rmsnorm",
        norm_eps=hf["rms_norm_eps"], position="rope", rope_theta=theta, rope_scaling=scaling,
        bias="qkv" if model_type in ("qwen2", "qwen2_moe") else "none",
        attention=AttentionConfig(sliding_window=window, qk_norm=model_type == "qwen3"),
        mlp=MlpConfig(d_ff=hf["intermediate_size"], activation=_activation(hf["hidden_act"]), gated=True),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe,
    )


@dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one or more jaxllm params (several: a fused tensor split on its out axis).

    `transpose`: the HF tensor is torch Linear-style [out, in]; `n_in`: how many leading dims of the
    jaxllm param are input dims (0 for vectors). Layer entries hold `{i}` and map to stacked params; expert
    entries also hold `{j}` and map to slice j of the param's expert axis (the one after `layers`).
    """

    hf: str
    paths: tuple[tuple[str, ...], ...]
    transpose: bool = False
    n_in: int = 1


def _entries(cfg: ModelConfig, model_type: str) -> tuple[list[Entry], list[Entry]]:
    """(top-level entries, per-layer entries) for a model family."""
    E = lambda hf, *paths, t=False, n=1: Entry(hf, tuple(tuple(p.split(".")) for p in paths), t, n)
    if model_type == "gpt2":
        p = "transformer.h.{i}."
        layer = [
            E(p + "ln_1.weight", "attn_norm.scale", n=0), E(p + "ln_1.bias", "attn_norm.bias", n=0),
            E(p + "attn.c_attn.weight", "attn.q.kernel", "attn.k.kernel", "attn.v.kernel"),
            E(p + "attn.c_attn.bias", "attn.q.bias", "attn.k.bias", "attn.v.bias", n=0),
            E(p + "attn.c_proj.weight", "attn.o.kernel", n=2), E(p + "attn.c_proj.bias", "attn.o.bias", n=0),
            E(p + "ln_2.weight", "mlp_norm.scale", n=0), E(p + "ln_2.bias", "mlp_norm.bias", n=0),
            E(p + "mlp.c_fc.weight", "mlp.up.kernel"), E(p + "mlp.c_fc.bias", "mlp.up.bias", n=0),
            E(p + "mlp.c_proj.weight", "mlp.down.kernel"), E(p + "mlp.c_proj.bias", "mlp.down.bias", n=0),
        ]
        top = [E("transformer.wte.weight", "embed.embedding"), E("transformer.wpe.weight", "pos_embed.embedding"),
               E("transformer.ln_f.weight", "final_norm.scale", n=0), E("transformer.ln_f.bias", "final_norm.bias", n=0)]
        return top, layer
    p = "model.layers.{i}."
    layer = [E(p + "input_layernorm.weight", "attn_norm.scale", n=0),
             E(p + "post_attention_layernorm.weight", "mlp_norm.scale", n=0)]
    layer += [E(p + f"self_attn.{x}_proj.weight", f"attn.{x}.kernel", t=True) for x in "qkv"]
    layer += [E(p + "self_attn.o_proj.weight", "attn.o.kernel", t=True, n=2)]
    if cfg.moe.num_experts and model_type == "qwen2_moe":  # experts and the gated shared expert under `mlp.`
        layer += [E(p + "mlp.gate.weight", "mlp.router", t=True), E(p + "mlp.shared_expert_gate.weight", "mlp.shared_gate", t=True)]
        layer += [E(p + f"mlp.experts.{{j}}.{x}_proj.weight", f"mlp.{x}", t=True) for x in ("gate", "up", "down")]
        layer += [E(p + f"mlp.shared_expert.{x}_proj.weight", f"mlp.shared.{x}.kernel", t=True) for x in ("gate", "up", "down")]
    elif cfg.moe.num_experts:  # Mixtral: w1 = gate, w3 = up, w2 = down per expert; the router is `gate`
        q = p + "block_sparse_moe."
        layer += [E(q + "gate.weight", "mlp.router", t=True)]
        layer += [E(q + f"experts.{{j}}.{w}.weight", f"mlp.{x}", t=True) for w, x in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
    else:
        layer += [E(p + f"mlp.{x}_proj.weight", f"mlp.{x}.kernel", t=True) for x in ("gate", "up", "down")]
    if cfg.bias == "qkv":
        layer += [E(p + f"self_attn.{x}_proj.bias", f"attn.{x}.bias", n=0) for x in "qkv"]
    if cfg.attention.qk_norm:
        layer += [E(p + f"self_attn.{x}_norm.weight", f"attn.{x}_norm.scale", n=0) for x in "qk"]
    top = [E("model.embed_tokens.weight", "embed.embedding"), E("model.norm.weight", "final_norm.scale", n=0)]
    if not cfg.tie_embeddings:
        top.append(E("lm_head.weight", "lm_head.kernel", t=True))
    return top, layer


def _layer_names(entry: Entry, i: int, cfg: ModelConfig) -> list[str]:
    """HF names of a layer entry in layer i: one, or one per expert."""
    if "{j}" in entry.hf:
        return [entry.hf.format(i=i, j=j) for j in range(cfg.moe.num_experts)]
    return [entry.hf.format(i=i)]


def _from_hf(entry: Entry, x: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    if entry.transpose:
        x = x.T
    parts = np.split(x, len(shapes), axis=-1) if len(shapes) > 1 else [x]
    return [part.reshape(shape) for part, shape in zip(parts, shapes)]


def _to_hf(entry: Entry, ys: list[np.ndarray]) -> np.ndarray:
    flat = [y.reshape(-1) if entry.n_in == 0 else y.reshape(math.prod(y.shape[: entry.n_in]), -1) for y in ys]
    x = np.concatenate(flat, axis=-1) if len(flat) > 1 else flat[0]
    return x.T if entry.transpose else x


def params_from_hf(
    cfg: ModelConfig, model_type: str, tensors: Mapping[str, np.ndarray], param_shapes: Mapping[str, Any]
) -> dict[str, Any]:
    """jaxllm params (layers stacked) from HF-named tensors (a dict, or a lazy mapping reading files).

    `param_shapes` is `LanguageModel.param_shapes`. Missing or unexpected names are one error
    listing them all; a tied `lm_head.weight` is accepted when it equals the embedding table.
    """
    top, layer = _entries(cfg, model_type)
    names = [e.hf for e in top] + [n for e in layer for i in range(cfg.num_layers) for n in _layer_names(e, i, cfg)]
    missing = [n for n in names if n not in tensors]
    extra = set(tensors) - set(names) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if missing or extra:
        raise ConfigError(
            f"HF checkpoint does not match the {model_type} layout: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {sorted(extra)[:8]}"
        )
    params: dict[str, Any] = {}
    for e in top:
        shapes = [get_path(param_shapes, p).shape for p in e.paths]
        for path, value in zip(e.paths, _from_hf(e, np.asarray(tensors[e.hf]), shapes)):
            set_path(params, path, value)
    for e in layer:
        experts = "{j}" in e.hf
        shapes = [get_path(param_shapes["blocks"], p).shape[2 if experts else 1:] for p in e.paths]
        load = lambda name: _from_hf(e, np.asarray(tensors[name]), shapes)
        per_layer = [[np.stack(v) for v in zip(*map(load, _layer_names(e, i, cfg)))] if experts
                     else load(e.hf.format(i=i)) for i in range(cfg.num_layers)]
        for j, path in enumerate(e.paths):
            set_path(params, ("blocks",) + path, np.stack([values[j] for values in per_layer]))
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), params["embed"]["embedding"]):
            raise ConfigError("tie_word_embeddings is set but lm_head.weight differs from the embedding table")
    return params


def params_to_hf(cfg: ModelConfig, model_type: str, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf`: HF-named numpy tensors."""
    top, layer = _entries(cfg, model_type)
    out = {e.hf: _to_hf(e, [np.asarray(get_path(params, p)) for p in e.paths]) for e in top}
    for e in layer:
        stacked = [np.asarray(get_path(params["blocks"], p)) for p in e.paths]
        for i in range(cfg.num_layers):
            for j, name in enumerate(_layer_names(e, i, cfg)):
                pick = (lambda s: s[i, j]) if "{j}" in e.hf else (lambda s: s[i])
                out[name] = np.ascontiguousarray(_to_hf(e, [pick(s) for s in stacked]))
    return out


def model_type_of(cfg: ModelConfig) -> str:
    """The HF family that represents `cfg`, or a ConfigError saying why none does."""
    if cfg.bottleneck.width:
        raise ConfigError("bottleneck adapters (model.bottleneck) are modules of their own: they do not merge into the "
                          "base's weights and no Hugging Face family holds them")
    if cfg.moe.num_experts and cfg.moe.lora_rank:
        raise ConfigError("MixLoRA experts (model.moe.lora_rank) share one dense FFN: no Hugging Face family holds them")
    if cfg.position == "learned" and cfg.norm == "layernorm" and cfg.bias == "all" and not cfg.mlp.gated:
        return "gpt2"
    if cfg.position != "rope" or cfg.norm != "rmsnorm" or not cfg.mlp.gated or cfg.bias == "all":
        raise ConfigError("no Hugging Face family matches this config (Llama-like needs rope, rmsnorm, gated "
                          "MLP, bias none/qkv; GPT-2 needs learned positions, layernorm, bias all, plain MLP)")
    if cfg.attention.logit_softcap or cfg.final_logit_softcap:
        raise ConfigError("soft-capping has no Hugging Face equivalent among llama/mistral/qwen2/qwen3/gpt2")
    if cfg.rope_scaling.type == "ntk":
        raise ConfigError("model.rope_scaling.type=ntk (a fixed NTK-aware theta) has no Hugging Face rope type; "
                          "export it with rope_theta scaled instead, or use linear / yarn / llama3")
    if cfg.moe.num_experts:
        m = cfg.moe
        qwen_like = (m.routing, m.router, m.every, m.null_experts, m.shared_experts) == ("topk", "linear", 1, 0, 1)
        if qwen_like and m.shared_gate and cfg.bias == "qkv" and not cfg.attention.qk_norm and not cfg.attention.sliding_window:
            return "qwen2_moe"
        mixtral_like = (m.routing, m.router, m.every, m.normalize_top_k) == ("topk", "linear", 1, True) and m.d_ff in (None, cfg.mlp.d_ff)
        if m.shared_experts or m.null_experts or cfg.attention.qk_norm or cfg.bias != "none" or not mixtral_like:
            raise ConfigError("an MoE model exports as Mixtral only with top-k linear routing in every layer and "
                              "without shared or null experts, qk_norm, biases or a separate moe.d_ff "
                              "(Qwen2-MoE: one gated shared expert, qkv bias, no window)")
        return "mixtral"
    if cfg.attention.qk_norm:
        if cfg.bias != "none" or cfg.attention.sliding_window:
            raise ConfigError("qk_norm (qwen3) cannot be combined with biases or a sliding window")
        return "qwen3"
    if cfg.bias == "qkv":
        if cfg.attention.sliding_window:
            raise ConfigError("qkv bias (qwen2) with a global sliding window has no Hugging Face equivalent")
        return "qwen2"
    return "mistral" if cfg.attention.sliding_window else "llama"


_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """A `config.json` dict that `transformers` builds the same model from."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM"}[model_type]
    if model_type == "gpt2":
        return {
            "model_type": "gpt2", "architectures": [arch], "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_positions": cfg.max_seq_len, "n_inner": cfg.mlp.d_ff,
            "activation_function": "gelu_new" if cfg.mlp.activation == "gelu_tanh" else _ACT_TO_HF[cfg.mlp.activation],
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s.type == "llama3":
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_seq_len)
    elif s.type == "linear":
        rope.update(rope_type="linear", factor=s.factor)
    elif s.type == "yarn":
        rope.update(rope_type="yarn", factor=s.factor, original_max_position_embeddings=s.original_max_seq_len,
                    beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate,
                    **({"attention_factor": s.attention_factor} if s.attention_factor is not None else {}))
    out = {
        "model_type": model_type, "architectures": [arch], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp.d_ff, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": _ACT_TO_HF[cfg.mlp.activation],
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
    }
    if s.type != "none":
        out["rope_scaling"] = rope
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.attention.sliding_window
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.load_balance_loss / cfg.moe.top_k)
    if model_type == "qwen2_moe":
        m = cfg.moe
        out.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.d_ff or cfg.mlp.d_ff,
                   shared_expert_intermediate_size=m.shared_d_ff or (m.d_ff or cfg.mlp.d_ff), norm_topk_prob=m.normalize_top_k,
                   decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
                   router_aux_loss_coef=m.load_balance_loss / m.top_k)
    return out
