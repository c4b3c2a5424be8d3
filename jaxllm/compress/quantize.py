"""Quantising a trained model's linear maps with SpQR (`jaxllm.compress.spqr`): the Hessian proxies H = X^T X of every
target's inputs from one calibration pass (`jaxllm.peft.calibration`), then each layer's matrix quantised on its own
(one-shot: every layer calibrated on the unquantised model)."""

from __future__ import annotations

import math
from typing import Iterable

import jax
import numpy as np

from jaxllm.compress.spqr import SpqrKernel, SpqrSpec, quantize_matrix, spqr_kernel
from jaxllm.config import ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, replace_path
from jaxllm.peft.calibration import input_statistics
from jaxllm.peft.lora import find_targets


def _gram(x_MI: jax.Array) -> jax.Array:
    return x_MI.T @ x_MI


def spqr(lm: LanguageModel, params: Params, spec: SpqrSpec, rows: Iterable[np.ndarray],
         targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")) -> tuple[Params, dict[str, float]]:
    """(`params` with every target kernel an `SpqrKernel`, {"bits_per_param", "outlier_share"} over the targets)."""
    found = find_targets(lm, targets, "quantize targets")
    rows = list(rows)
    if not rows:
        raise ConfigError("SpQR needs calibration text: give at least one row of tokens")
    hessians, _ = input_statistics(lm, params, found, rows, _gram)
    one = jax.jit(lambda w, h: quantize_matrix(w, h, spec))
    n_params = n_outliers = 0
    for t in found:
        I, O = math.prod(t.in_shape), math.prod(t.out_shape)
        spec.check((O, I))
        w_LIO = get_path(params, t.path + ("kernel",)).reshape(-1, I, O)
        h_LII = get_path(hessians, t.path)["stat"].reshape(-1, I, I)
        matrices = [one(w_LIO[i].T, h_LII[i]) for i in range(w_LIO.shape[0])]
        kernel = spqr_kernel(matrices, t.shape, t.lead)
        params = replace_path(params, t.path + ("kernel",), kernel)
        n_params, n_outliers = n_params + w_LIO.size, n_outliers + kernel.num_outliers
    return params, {"bits_per_param": spec.bits_per_param(n_outliers, n_params), "outlier_share": n_outliers / n_params}


def dequantized(params: Params) -> Params:
    """`params` with every quantised kernel replaced by its dense f32 values (for formats without SpQR)."""
    return jax.tree.map(lambda k: k.dequantize() if isinstance(k, SpqrKernel) else k, params,
                        is_leaf=lambda k: isinstance(k, SpqrKernel))
