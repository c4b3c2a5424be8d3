"""Hugging Face `peft` LoRA, MiSS (Bone / Bat) and LoHa (ABBA) adapters in and out: `adapter_config.json` +
`adapter_model.safetensors`.

peft stores, per adapted torch Linear `<module>`, `base_model.model.<module>.lora_A.weight` [r, in],
`lora_B.weight` [out, r] and for DoRA `lora_magnitude_vector` [out]; ours are `a` [*in, r], `b`
[r, *out] and `magnitude` [*out] stacked over layers. MiSS stores `<module>.miss_block`: Bone [r, out] (ours
[r, *out]), Bat [out / r, r, r] (ours the same). LoHa stores `hada_w{1,2}_{a,b}`: ABBA's B^T and A^T.
Module names come from the same table that maps
the base checkpoint (`hf_mapping`), so every family whose targets map one-to-one is covered.

Adapters initialised from W (PiSSA, MiLoRA, OLoRA) are trained against a residual base; exported,
they become a plain LoRA of rank 2r on the original base, s (A B - A0 B0) = s' [A, A0] [B; -B0] with
s' = s (alpha doubled, or times sqrt 2 for rsLoRA) -- what peft's own conversion does.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ConfigError, LoraConfig
from jaxllm.interop.hf_mapping import _entries
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into
from jaxllm.peft.abba import AbbaAdapter
from jaxllm.peft.lora import LoraAdapter
from jaxllm.peft.miss import MissAdapter

PREFIX = "base_model.model."
_RESIDUAL_INITS = ("pissa", "milora", "olora")


def module_names(lm: LanguageModel, model_type: str) -> dict[tuple[str, ...], str]:
    """Our linear-layer path -> HF module name (`{i}` for the layer) for maps that are one HF Linear."""
    top, layer = _entries(lm.cfg, model_type)
    names: dict[tuple[str, ...], str] = {}
    for prefix, entries in (((), top), (("blocks",), layer)):
        for e in entries:
            if len(e.paths) == 1 and e.paths[0][-1] == "kernel" and e.hf.endswith(".weight"):
                names[prefix + e.paths[0][:-1]] = e.hf[: -len(".weight")]
    return names


def _as_plain_lora(adapter: LoraAdapter, lora: Params, initial: Params | None) -> tuple[LoraConfig, Params]:
    spec = adapter.spec
    if spec.init not in _RESIDUAL_INITS:
        return spec, lora
    if initial is None:
        raise ValueError(f"a {spec.init} adapter is trained against a residual base; pass `initial` (the adapter "
                         "as initialised) to export it as a LoRA for the original base")
    out: Params = {}
    for t in adapter.targets:
        now, start = get_path(lora, t.path), get_path(initial, t.path)
        leaves = {"a": np.concatenate([np.asarray(now["a"]), np.asarray(start["a"])], axis=t.n_lead + t.n_in),
                  "b": np.concatenate([np.asarray(now["b"]), -np.asarray(start["b"])], axis=t.n_lead)}
        if "magnitude" in now:
            leaves["magnitude"] = np.asarray(now["magnitude"])
        merge_into(out, t.path, leaves)
    factor = math.sqrt(2) if spec.rslora else 2.0
    return replace(spec, rank=2 * spec.rank, alpha=spec.alpha * factor, init="lora"), out


def save_peft_adapter(
    directory: str | Path, adapter: LoraAdapter, lora: Params, model_type: str, *,
    initial: Params | None = None, base_model: str | None = None,
) -> Path:
    """Write `lora` (an adapter tree of `adapter`) in peft's format; returns the directory."""
    from safetensors.numpy import save_file

    names = module_names(adapter.lm, model_type)
    missing = [t.name for t in adapter.targets if t.path not in names]
    if missing:
        raise ConfigError(f"{missing} have no single Hugging Face {model_type} Linear to attach a peft adapter to")
    if isinstance(adapter, MissAdapter):
        return _save_miss(Path(directory), adapter, lora, names, base_model)
    if isinstance(adapter, AbbaAdapter):
        return _save_loha(Path(directory), adapter, lora, names, base_model)
    spec, lora = _as_plain_lora(adapter, lora, initial)
    tensors: dict[str, np.ndarray] = {}
    for t in adapter.targets:
        leaves = {k: np.asarray(v, np.float32) for k, v in get_path(lora, t.path).items()}
        layers = range(t.lead[0]) if t.n_lead else [None]
        for i in layers:
            pick = (lambda x: x[i]) if i is not None else (lambda x: x)
            module = PREFIX + names[t.path].format(i=i)
            a = pick(leaves["a"]).reshape(math.prod(t.in_shape), spec.rank)
            b = pick(leaves["b"]).reshape(spec.rank, math.prod(t.out_shape))
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
            if "magnitude" in leaves:
                tensors[f"{module}.lora_magnitude_vector"] = pick(leaves["magnitude"]).reshape(-1)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "use_dora": spec.dora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "target_modules": sorted({names[t.path].rsplit(".", 1)[-1] for t in adapter.targets}),
        "modules_to_save": None, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _save_miss(out: Path, adapter: MissAdapter, tree: Params, names: dict[tuple[str, ...], str],
               base_model: str | None) -> Path:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for t in adapter.targets:
        block = np.asarray(get_path(tree, t.path)["block"], np.float32)
        for i in range(t.lead[0]) if t.n_lead else [None]:
            one = block[i] if i is not None else block
            shape = one.shape if adapter.bat else (adapter.spec.rank, -1)  # Bat's [out / r, r, r] is peft's layout
            tensors[f"{PREFIX}{names[t.path].format(i=i)}.miss_block"] = np.ascontiguousarray(one.reshape(shape))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "MISS", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": adapter.spec.rank, "init_weights": "bat" if adapter.bat else True, "mini_r": 1, "miss_dropout": 0.0,
              "bias": "none", "target_modules": sorted({names[t.path].rsplit(".", 1)[-1] for t in adapter.targets}),
              "modules_to_save": None, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _loha_names(module: str) -> dict[str, str]:
    """Our ABBA leaf -> peft's LoHa tensor: hada_w1_a [out, r] = B1^T, hada_w1_b [r, in] = A1^T (and 2 likewise)."""
    return {"a1": f"{module}.hada_w1_b", "b1": f"{module}.hada_w1_a", "a2": f"{module}.hada_w2_b",
            "b2": f"{module}.hada_w2_a"}


def _save_loha(out: Path, adapter: AbbaAdapter, tree: Params, names: dict[tuple[str, ...], str],
               base_model: str | None) -> Path:
    from safetensors.numpy import save_file

    r, tensors = adapter.spec.rank, {}
    for t in adapter.targets:
        leaves = {k: np.asarray(v, np.float32) for k, v in get_path(tree, t.path).items()}
        for i in range(t.lead[0]) if t.n_lead else [None]:
            for leaf, key in _loha_names(PREFIX + names[t.path].format(i=i)).items():
                x = leaves[leaf][i] if i is not None else leaves[leaf]
                x = x.reshape(-1, r) if leaf[0] == "a" else x.reshape(r, -1)
                tensors[key] = np.ascontiguousarray(x.T)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LOHA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "alpha": adapter.scale * r, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
              "init_weights": True, "target_modules": sorted({names[t.path].rsplit(".", 1)[-1] for t in adapter.targets}),
              "modules_to_save": None, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_peft_adapter(directory: str | Path, lm: LanguageModel, model_type: str) -> tuple[LoraAdapter, Params]:
    """(adapter, adapter params) from a peft LoRA, MiSS or LoHa directory, for `lm` (the same base model): a
    LoraAdapter, or its MissAdapter / AbbaAdapter subclass; `adapter.apply(base, params)` either way."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    d = Path(directory)
    if not (d / "adapter_config.json").exists():
        raise ConfigError(f"{d} holds no adapter_config.json (not a peft adapter directory)")
    if not (d / "adapter_model.safetensors").exists():
        raise ConfigError(f"{d} holds no adapter_model.safetensors (pickled adapter_model.bin is never loaded)")
    hf: dict[str, Any] = json.loads((d / "adapter_config.json").read_text())
    if hf.get("peft_type") not in ("LORA", "MISS", "LOHA"):
        raise ConfigError(f"peft_type {hf.get('peft_type')!r} is not supported; supported: LORA, MISS, LOHA")
    if hf["peft_type"] == "LOHA" and (hf.get("rank_dropout") or hf.get("module_dropout")):
        raise ConfigError("peft LoHa adapters with rank_dropout or module_dropout are not supported")
    if hf["peft_type"] == "MISS" and hf.get("init_weights", True) not in (True, "bat"):
        raise ConfigError(f"peft MiSS init_weights={hf.get('init_weights')!r} is not supported; supported: true (Bone), "
                          "'bat'")
    for key in ("rank_pattern", "alpha_pattern"):
        if hf.get(key):
            raise ConfigError(f"peft {key} (per-module ranks) is not supported")
    if hf.get("bias", "none") != "none" or hf.get("modules_to_save"):
        raise ConfigError("peft adapters with trained biases or modules_to_save are not supported")
    try:
        tensors = load_file(str(d / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{d / 'adapter_model.safetensors'} is not a readable safetensors file: {err}") from err

    names = module_names(lm, model_type)
    by_short = {name.rsplit(".", 1)[-1]: path for path, name in names.items()}
    targets = hf["target_modules"] if isinstance(hf["target_modules"], list) else [hf["target_modules"]]
    unknown = [t for t in targets if t not in by_short]
    if unknown:
        raise ConfigError(f"peft target_modules {unknown} are not {model_type} linear layers; known: {sorted(by_short)}")
    paths = [".".join(by_short[t]) for t in targets]
    if hf["peft_type"] == "MISS":
        bat = hf.get("init_weights") == "bat"
        adapter: LoraAdapter = MissAdapter(lm, LoraConfig(targets=paths, rank=int(hf["r"])), bat=bat)

        def read(module, t):  # our leaf -> (peft's tensor name, its layout -> ours)
            return {"block": (f"{module}.miss_block", lambda x: x if bat else x.reshape(x.shape[0], *t.out_shape))}
    elif hf["peft_type"] == "LOHA":
        r = int(hf["r"])
        adapter = AbbaAdapter(lm, LoraConfig(targets=paths, rank=r, alpha=float(hf["alpha"])))

        def read(module, t):
            layout = lambda leaf: ((lambda x: x.T.reshape(*t.in_shape, r)) if leaf[0] == "a"
                                   else (lambda x: x.T.reshape(r, *t.out_shape)))
            return {leaf: (key, layout(leaf)) for leaf, key in _loha_names(module).items()}
    else:
        spec = LoraConfig(targets=paths, rank=int(hf["r"]), alpha=float(hf["lora_alpha"]),
                          dropout=float(hf.get("lora_dropout") or 0.0), rslora=bool(hf.get("use_rslora")),
                          dora=bool(hf.get("use_dora")))
        adapter = LoraAdapter(lm, spec)

        def read(module, t):
            leaves = {"a": (f"{module}.lora_A.weight", lambda x: x.T.reshape(*t.in_shape, spec.rank)),
                      "b": (f"{module}.lora_B.weight", lambda x: x.T.reshape(spec.rank, *t.out_shape))}
            if spec.dora:
                leaves["magnitude"] = (f"{module}.lora_magnitude_vector", lambda x: x.reshape(t.out_shape))
            return leaves

    lora: Params = {}
    used: set[str] = set()
    for t in adapter.targets:
        per_layer: dict[str, list[np.ndarray]] = {}
        for i in range(t.lead[0]) if t.n_lead else [None]:
            leaves = read(PREFIX + names[t.path].format(i=i), t)
            absent = [key for key, _ in leaves.values() if key not in tensors]
            if absent:
                raise ConfigError(f"peft adapter in {d} lacks {absent[:4]}")
            for leaf, (key, layout) in leaves.items():
                used.add(key)
                per_layer.setdefault(leaf, []).append(layout(tensors[key]))
        merge_into(lora, t.path, {k: np.stack(v) if t.n_lead else v[0] for k, v in per_layer.items()})
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConfigError(f"peft adapter in {d} has tensors jaxllm does not map: {extra[:4]}")
    return adapter, lora
