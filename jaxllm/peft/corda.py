"""CorDA (Yang et al., 2024): context-oriented decomposition. Each target W (ours J = W^T [in, out]) is decomposed
with the covariance C of its inputs on a few calibration samples (`calibration.input_statistics`): the SVD of
W C' (C' = C + damp * mean(diag C) * I, damp = 0.01 doubled until C' C'^-1 is within 0.05 of I in Frobenius norm,
peft's rule) gives U S V_h; V = (V_h C'^-1)^T. The adapter is a LoRA whose A, B carry sqrt(S / scale) of the top-r
triplets (`ipm`, instruction-previewed: learn the task's main directions) or the bottom-r (`kpm`, knowledge-preserving:
leave the directions the calibration data uses alone); the frozen residual is W minus scale * A B, so the adapted
model starts as the base. After init it trains, merges and exports as any residual-init LoRA (PiSSA's path).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, LoraConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into
from jaxllm.peft.calibration import input_statistics
from jaxllm.peft.lora import LoraAdapter

MODES = ("ipm", "kpm")


def damped(cov_II: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C', C'^-1): C plus the smallest damp * mean(diag C) * I (damp = 0.01 * 2^k) whose inverse is accurate."""
    damp, eye = 0.01, np.eye(cov_II.shape[0])
    while True:
        fixed = cov_II + eye * np.mean(np.diag(cov_II)) * damp
        inverse = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inverse - eye) < 0.05:
            return fixed, inverse
        damp *= 2


def corda_factors(w_IO: np.ndarray, cov_II: np.ndarray, rank: int, scale: float, mode: str):
    """(A [in, r], B [r, out], residual [in, out]) of one matrix, in float64."""
    fixed, inverse = damped(cov_II)
    u_IK, s_K, vt_KO = np.linalg.svd(fixed @ w_IO, full_matrices=False)  # (W C')^T = C' J
    pick = slice(0, rank) if mode == "ipm" else slice(len(s_K) - rank, None)
    root = np.sqrt(s_K[pick] / scale)
    a = (inverse @ u_IK[:, pick]) * root
    b = root[:, None] * vt_KO[pick]
    return a, b, w_IO - scale * (a @ b)


class CordaAdapter(LoraAdapter):
    """A LoRA built by CorDA from calibration samples (`calibrate`, then `init`)."""

    def __init__(self, lm: LanguageModel, spec: LoraConfig, mode: str = "ipm"):
        if mode not in MODES:
            raise ConfigError(f"CorDA mode {mode!r}; choose one of {list(MODES)}")
        # a residual init, as PiSSA's, for the peft export (a LoRA on the original base)
        super().__init__(lm, dataclasses.replace(spec, init="pissa", dora=False))
        self.mode = mode
        self.covariance: Params | None = None

    def calibrate(self, base: Params, samples: Iterable[np.ndarray]) -> int:
        """Collect each target's input covariance (mean over samples of X^T X, X = x / |max x|) on the base; returns
        the number of samples."""
        total, n = input_statistics(self.lm, base, self.targets, samples)
        self.covariance = jax.tree.map(lambda x: np.asarray(x, np.float64) / n, total)
        return n

    def init(self, key: jax.Array, base: Params) -> tuple[Params, Params]:
        """(adapter, frozen residual base) from the calibrated covariances (host numpy; `key` unused)."""
        if self.covariance is None:
            raise ValueError("CorDA needs its calibration pass first: adapter.calibrate(base, samples)")
        adapter: Params = {}
        frozen = base
        for t in self.targets:
            w_LIO = np.asarray(self.kernel_matrix(base, t), np.float64)
            cov_LII = get_path(self.covariance, t.path)["stat"].reshape(w_LIO.shape[0], w_LIO.shape[1], -1)
            parts = [corda_factors(w_IO, c, self.spec.rank, self.scale, self.mode) for w_IO, c in zip(w_LIO, cov_LII)]
            a, b, residual = (np.stack(x).astype(np.float32) for x in zip(*parts))
            merge_into(adapter, t.path, {"a": a.reshape(*t.lead, *t.in_shape, -1),
                                         "b": b.reshape(*t.lead, -1, *t.out_shape)})
            frozen = self._with_kernel(frozen, t, jnp.asarray(residual))
        return adapter, self.frozen_of(frozen)
