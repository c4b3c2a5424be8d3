"""Pruning a trained model's linear maps: magnitude (|W|) or Wanda (|W_ij| * ||X_i||_2, Sun et al. 2024), to an
unstructured sparsity or an N:M pattern, on the maps `targets` names (the layers' projections; embeddings and the
output head are kept).

Kernels are [*lead, *in, *out]; each layer's map is scored as a matrix [I, O]. Wanda compares the weights feeding
one output (the paper's per-output group) and needs ||X_i||_2, the norm of input i over the calibration tokens,
collected by `jaxllm.peft.calibration` (one gradient pass per sample row, no hooks). Magnitude compares a whole
matrix (the paper's baseline). N:M keeps the n highest scores of each m consecutive inputs of an output, both methods.
With `sequential`, layer l's statistics come from the model whose layers < l are already pruned (as the paper's
code does); that costs one calibration pass per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.compress.masks import n_of_m_keep, unstructured_keep
from jaxllm.config import ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, replace_path
from jaxllm.peft.calibration import input_statistics
from jaxllm.peft.lora import Target, find_targets

PRUNE_METHODS = ("magnitude", "wanda")
LAYER_MAPS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class PruneSpec:
    method: str = "wanda"  # wanda | magnitude
    sparsity: float = 0.5  # share of each map's weights set to zero (unstructured)
    pattern: tuple[int, int] | None = None  # (n, m): keep n of every m consecutive inputs (2:4); overrides sparsity
    targets: tuple[str, ...] = LAYER_MAPS  # names or regexes of linear maps (as finetune.lora.targets)
    sequential: bool = True  # wanda: each layer calibrated on the model with the layers below already pruned

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda"

    @property
    def target_sparsity(self) -> float:
        return 1 - self.pattern[0] / self.pattern[1] if self.pattern else self.sparsity

    def check(self, targets: list[Target]) -> None:
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"pruning method {self.method!r}; choose one of {list(PRUNE_METHODS)}")
        if self.pattern is None:
            if not 0 <= self.sparsity < 1:
                raise ConfigError(f"sparsity={self.sparsity} must be within [0, 1)")
            return
        n, m = self.pattern
        if not 0 < n < m:
            raise ConfigError(f"N:M pattern {n}:{m} needs 0 < N < M (e.g. 2:4)")
        for t in targets:
            if math.prod(t.in_shape) % m:
                raise ConfigError(f"N:M pattern {n}:{m}: {t.name} has {math.prod(t.in_shape)} inputs, not a multiple "
                                  f"of {m}")


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise ConfigError(f"N:M pattern {text!r}: write it as N:M, e.g. 2:4") from None
    return n, m


def keep_mask(w_IO: jax.Array, norms_I: jax.Array | None, spec: PruneSpec) -> jax.Array:
    """bool [I, O] of the weights `spec` keeps in one matrix; `norms_I` = ||X_i||_2 (Wanda) or None (magnitude)."""
    scores_IO = jnp.abs(w_IO.astype(jnp.float32))
    if norms_I is not None:
        scores_IO = scores_IO * norms_I[:, None]
    if spec.pattern:
        return n_of_m_keep(scores_IO, *spec.pattern)
    return unstructured_keep(scores_IO, spec.sparsity, per_output=spec.method == "wanda")


def _squared_norms(x_MI: jax.Array) -> jax.Array:
    return jnp.sum(x_MI * x_MI, axis=0)


def input_norms(lm: LanguageModel, params: Params, targets: list[Target], rows: Iterable[np.ndarray]) -> Params:
    """{target path: {"stat": ||X_i||_2 [*lead, I]}}: each input channel's L2 norm over the tokens of `rows`."""
    sums, _ = input_statistics(lm, params, targets, rows, _squared_norms)
    return jax.tree.map(jnp.sqrt, sums)


def prune(lm: LanguageModel, params: Params, spec: PruneSpec, rows: list[np.ndarray] | None = None) -> Params:
    """`params` with the target maps pruned as `spec` says; `rows`: calibration token rows [T] (Wanda)."""
    targets = find_targets(lm, spec.targets, "prune targets")
    spec.check(targets)
    if spec.needs_calibration and not rows:
        raise ConfigError("Wanda needs calibration text: give at least one row of tokens")
    layers = max((t.lead[0] for t in targets if t.lead), default=1)
    stages = range(layers) if spec.needs_calibration and spec.sequential else [None]
    for layer in stages:
        norms = input_norms(lm, params, targets, rows) if spec.needs_calibration else None
        params = _prune_layers(params, targets, norms, spec, layer)
    return params


def _prune_layers(params: Params, targets: list[Target], norms: Params | None, spec: PruneSpec,
                  layer: int | None) -> Params:
    """Prune every target at stacked index `layer` (None: all layers; unstacked targets in the first stage)."""
    for t in targets:
        kernel = get_path(params, t.path + ("kernel",))
        I, O = math.prod(t.in_shape), math.prod(t.out_shape)
        w_LIO = kernel.reshape(-1, I, O)
        n_LI = None if norms is None else get_path(norms, t.path)["stat"].reshape(-1, I)
        if layer is None:
            picked = range(w_LIO.shape[0])
        elif t.lead:
            picked = [layer] if layer < t.lead[0] else []
        else:
            picked = [0] if layer == 0 else []
        for i in picked:
            keep = keep_mask(w_LIO[i], None if n_LI is None else n_LI[i], spec)
            w_LIO = w_LIO.at[i].set(jnp.where(keep, w_LIO[i], jnp.zeros((), w_LIO.dtype)))
        params = replace_path(params, t.path + ("kernel",), w_LIO.reshape(kernel.shape))
    return params


def sparsity_of(lm: LanguageModel, params: Params, names: Iterable[str] = LAYER_MAPS) -> dict[str, float]:
    """{target name: share of zero weights} and "all": over every target's weights together."""
    out, zeros, total = {}, 0, 0
    for t in find_targets(lm, tuple(names), "prune targets"):
        kernel = np.asarray(get_path(params, t.path + ("kernel",)))
        out[t.name] = float(np.mean(kernel == 0))
        zeros, total = zeros + int(np.sum(kernel == 0)), total + kernel.size
    out["all"] = zeros / max(total, 1)
    return out
