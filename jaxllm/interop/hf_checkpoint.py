"""Hugging Face checkpoint directories in and out: config.json + safetensors (sharded or not).

    lm, params, family = load_hf_checkpoint("path/to/llama")     # optionally straight onto a mesh
    save_hf_checkpoint("out/", lm, params)                      # AutoModelForCausalLM loads it

Only safetensors are read: a `pytorch_model.bin` is a pickle and is never opened here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.interop.hf_mapping import config_from_hf, config_to_hf, model_type_of, params_from_hf, params_to_hf
from jaxllm.language_model import LanguageModel, Params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    if not path.exists():
        raise ConfigError(f"{directory}: no config.json; files here: {sorted(p.name for p in Path(directory).iterdir())}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConfigError(f"{index} names shards that are missing: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    if pickles:
        raise ConfigError(
            f"{directory} holds only pickled weights {pickles}; jaxllm never unpickles files. Convert them to "
            "safetensors with a tool you trust, e.g. transformers' `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise ConfigError(f"{directory}: no weights (*.safetensors or model.safetensors.index.json)")


class SafetensorsReader(Mapping):
    """Tensors of several safetensors files by name, read on access (one tensor in memory at a time)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="np")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise ConfigError(f"{f}: not a readable safetensors file ({err}); is it truncated?") from None
            self._handles[f] = handle
            for name in handle.keys():
                self._where[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{self._where[name]}: cannot read tensor {name!r} ({err})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json beside its safetensors."""
    return (path / "config.json").exists()


def load_hf_checkpoint(
    directory: str | Path, *, param_dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[LanguageModel, Params, str]:
    """(model, params, HF family) from a checkpoint directory.

    Tensors are read one at a time and placed with `lm.param_shardings(mesh)` when a mesh is given,
    so each device receives only its shards. `param_dtype` (default float32) converts on load.
    """
    directory = Path(directory)
    hf = read_hf_config(directory)
    cfg = config_from_hf(hf)
    if param_dtype:
        cfg.param_dtype = param_dtype
    lm = LanguageModel(cfg)
    reader = SafetensorsReader(_weight_files(directory))
    host = params_from_hf(cfg, hf["model_type"], reader, lm.param_shapes)
    dtype = jnp.dtype(cfg.param_dtype)
    if mesh is None:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), host)
    else:
        params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, dtype), s), host, lm.param_shardings(mesh))
    return lm, params, hf["model_type"]


def save_hf_checkpoint(
    directory: str | Path, cfg: ModelConfig, params: Params, *, tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
) -> str:
    """Write config.json + model.safetensors (+ tokenizer files copied from `tokenizer_dir`).
    Returns the HF family written."""
    from safetensors.numpy import save_file

    model_type = model_type_of(cfg)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = {k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in params_to_hf(cfg, model_type, jax.device_get(params)).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(cfg, model_type) | {"torch_dtype": dtype, "dtype": dtype}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists() and Path(tokenizer_dir).resolve() != out.resolve():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return model_type
