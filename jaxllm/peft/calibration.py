"""Calibration: statistics of the inputs each adapted linear map sees, from a pass over a few samples.

Every target's kernel becomes a `ProbedKernel` that computes x W as before and carries a zero probe leaf shaped like
the statistic; the probe's gradient is defined (a custom VJP) as the statistic of the layer's input x, whatever
gradient reaches the output. So one `jax.grad` of the model's output with respect to the probes returns every
target's statistic in every layer: through the layer scan, remat and a mesh, with no hooks and no materialised
activations. Statistics add over samples; one forward call per sample (a [T] token row), as peft's hooks see them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into, replace_path
from jaxllm.peft.lora import Target
from jaxllm.peft.lora_kernel import dense_matrix

Statistic = Callable[[jax.Array], jax.Array]  # a layer's input x [M, in] (f32) -> its statistic


def normalized_covariance(x_MI: jax.Array) -> jax.Array:
    """CorDA's per-sample statistic (peft's rule): X^T X [in, in] of X = x / |max(x)|."""
    x_MI = x_MI / jnp.abs(jnp.max(x_MI))
    return x_MI.T @ x_MI


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProbedKernel:
    """A frozen kernel [*in, *out] and a zero probe whose gradient is `statistic` of the input."""

    base: Any
    probe: jax.Array
    statistic: Statistic = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        w_IO = dense_matrix(self.base, math.prod(self.base.shape) // x_MI.shape[1], dtype)
        return _tap(x_MI @ w_IO, x_MI, self.probe, self.statistic)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tap(y_MO, x_MI, probe, statistic):
    return y_MO


def _tap_fwd(y_MO, x_MI, probe, statistic):
    return y_MO, x_MI


def _tap_bwd(statistic, x_MI, dy_MO):
    return dy_MO, jnp.zeros_like(x_MI), statistic(x_MI.astype(jnp.float32))


_tap.defvjp(_tap_fwd, _tap_bwd)


def input_statistics(lm: LanguageModel, params: Params, targets: list[Target], samples: Iterable[np.ndarray],
                     statistic: Statistic = normalized_covariance) -> tuple[Params, int]:
    """({target path: {"stat": per-layer sum of `statistic` over samples [*lead, ...]}}, number of samples)."""
    probe_shapes = {t.path: jax.eval_shape(statistic, jax.ShapeDtypeStruct((1, math.prod(t.in_shape)), jnp.float32))
                    for t in targets}

    def probed(probes: Params) -> Params:
        out = params
        for t in targets:
            kernel = ProbedKernel(get_path(params, t.path + ("kernel",)), get_path(probes, t.path)["stat"], statistic)
            out = replace_path(out, t.path + ("kernel",), kernel)
        return out

    @jax.jit
    def one(probes: Params, tokens_1T: jax.Array) -> Params:
        return jax.grad(lambda p: jnp.sum(lm.apply(probed(p), tokens_1T).astype(jnp.float32)))(probes)

    zeros: Params = {}
    for t in targets:
        merge_into(zeros, t.path, {"stat": jnp.zeros((*t.lead, *probe_shapes[t.path].shape), jnp.float32)})
    total, n = zeros, 0
    for row in samples:
        total = jax.tree.map(jnp.add, total, one(zeros, jnp.asarray(row, jnp.int32)[None]))
        n += 1
    if n == 0:
        raise ValueError("calibration needs at least one sample")
    return total, n
