"""A compact on-disk format for 2:4-sparse models (what `jaxllm compress --pattern 2:4 --compact` writes).

A directory with `config.yaml` (the run's config), `model.safetensors` and `compact.json`. Every linear map whose
kernel has at most 2 non-zeros in each group of 4 consecutive inputs of an output (Wanda / magnitude 2:4, MaskLLM) is
stored as its kept values [*lead, I/2, O] (in input order within each group, the kernel's dtype) and one uint8 per
group naming which of the 6 two-of-four patterns it keeps [*lead, I/4, O]: 0.5 x the values plus 2 bits per weight
(32-bit weights: 18 bits per weight instead of 32). Everything else is stored dense. Loading rebuilds the dense
kernels exactly (zeros where pruned): `generate`, `eval` and `convert` read the directory like any model directory.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into
from jaxllm.peft.lora import find_targets

PATTERNS = np.array(list(itertools.combinations(range(4), 2)), np.int64)  # [6, 2]: the kept positions, ascending
_PATTERN_OF = {tuple(p): i for i, p in enumerate(PATTERNS.tolist())}
FORMAT = "jaxllm-compact-2:4"


def is_compact_dir(path: str | Path) -> bool:
    return (Path(path) / "compact.json").exists() and (Path(path) / "config.yaml").exists()


def is_two_of_four(w_LIO: np.ndarray) -> bool:
    """Every group of 4 consecutive inputs of each output has at most 2 non-zeros (I divisible by 4)."""
    L, I, O = w_LIO.shape
    return I % 4 == 0 and bool(np.all((w_LIO.reshape(L, I // 4, 4, O) != 0).sum(2) <= 2))


def pack_two_of_four(w_LIO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values [L, I/2, O], patterns uint8 [L, I/4, O]) of a 2:4-sparse kernel; a group with fewer than 2 non-zeros
    keeps its lowest zero positions too."""
    L, I, O = w_LIO.shape
    g_LGFO = w_LIO.reshape(L, I // 4, 4, O)
    order = np.argsort((g_LGFO == 0) * 4 + np.arange(4)[None, None, :, None], axis=2, kind="stable")
    kept_LG2O = np.sort(order[:, :, :2], axis=2)
    values = np.take_along_axis(g_LGFO, kept_LG2O, axis=2).reshape(L, I // 2, O)
    code = np.zeros((4, 4), np.uint8)
    for (a, b), i in _PATTERN_OF.items():
        code[a, b] = i
    return values, code[kept_LG2O[:, :, 0], kept_LG2O[:, :, 1]]


def unpack_two_of_four(values_LHO: np.ndarray, patterns_LGO: np.ndarray) -> np.ndarray:
    """The dense kernel [L, I, O] (zeros where pruned) from `pack_two_of_four`'s output."""
    L, G, O = patterns_LGO.shape
    kept_LG2O = np.moveaxis(PATTERNS[patterns_LGO], -1, 2)  # [L, G, 2, O]
    w = np.zeros((L, G, 4, O), values_LHO.dtype)
    np.put_along_axis(w, kept_LG2O, values_LHO.reshape(L, G, 2, O), axis=2)
    return w.reshape(L, 4 * G, O)


def save_compact(dst: str | Path, config_yaml: str, lm: LanguageModel, params: Params) -> dict:
    """Write the directory; returns {"packed": [map names], "bytes": file size, "dense_bytes": the same params
    stored dense}."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    packed = set()
    for t in find_targets(lm, (".*",), "compact maps"):  # every linear map
        kernel = np.asarray(get_path(params, t.path + ("kernel",)))
        w_LIO = kernel.reshape(-1, math.prod(t.in_shape), math.prod(t.out_shape))
        if is_two_of_four(w_LIO):
            name = t.name + ".kernel"
            tensors[name + "::values"], tensors[name + "::patterns"] = pack_two_of_four(w_LIO)
            packed.add(name)
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = ".".join(str(k.key) for k in key_path)
        if name not in packed:
            tensors[name] = np.asarray(leaf)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.yaml").write_text(config_yaml)
    dense = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    report = {"format": FORMAT, "packed": sorted(p[: -len(".kernel")] for p in packed), "bytes": (dst / "model.safetensors").stat().st_size,
              "dense_bytes": int(dense)}
    (dst / "compact.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def load_compact(src: str | Path, lm: LanguageModel) -> Params:
    """The dense params of `lm` stored in a compact directory."""
    src = Path(src)
    meta = json.loads((src / "compact.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src}: compact.json names format {meta.get('format')!r}, not {FORMAT!r}")
    tensors = load_file(str(src / "model.safetensors"))
    params: Params = {}
    for key_path, shape in jax.tree_util.tree_leaves_with_path(lm.param_shapes):
        path = tuple(str(k.key) for k in key_path)
        name = ".".join(path)
        if name in tensors:
            value = tensors[name]
        elif name + "::values" in tensors:
            value = unpack_two_of_four(tensors[name + "::values"], tensors[name + "::patterns"])
        else:
            raise ValueError(f"{src}: model.safetensors has no tensor {name!r}")
        merge_into(params, path[:-1], {path[-1]: value.reshape(shape.shape)})
    return params
