"""SORSA (Cao, 2024): each target W [in, out] = U S V^T splits into its principal rank-r part U_r S_r V_r^T, which
trains as three factors (a = U_r [in, r], s = S_r [r], b = V_r^T [r, out]), and the frozen residual W - U_r S_r V_r^T;
an orthonormality regulariser ||a^T a - I||_F + ||b b^T - I||_F per target and layer keeps the singular vectors
singular vectors, so the scale of the update lives in s. The adapted layer is y = x W_res + ((x a) * s) b: a
`LoraKernel` with scale 1 and s between its factors, so merging, sharding and quantised bases are LoRA's.

The paper applies the regulariser's gradient with its own constant rate gamma; here gamma weighs it in the loss
(`TrainingMethod.regularizers`), so it shares the optimizer and the schedule with the task loss.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxllm.config import LoraConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into
from jaxllm.peft.inits.pissa import singular_triplets
from jaxllm.peft.lora import LoraAdapter, Target


class SorsaAdapter(LoraAdapter):
    """`LoraAdapter` whose adapters are principal singular triplets (rank, targets, quantisation from `spec`)."""

    def __init__(self, lm: LanguageModel, spec: LoraConfig):
        # scale 1 (alpha = rank); a residual init, as PiSSA's, for the peft export (a LoRA on the original base)
        super().__init__(lm, dataclasses.replace(spec, init="pissa", dora=False, rslora=False, alpha=float(spec.rank)))

    def _leaf_specs(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
        return {**super()._leaf_specs(t), "s": ((*t.lead, self.spec.rank), (*t.axes[: t.n_lead], None))}

    def init(self, key: jax.Array, base: Params) -> tuple[Params, Params]:
        """(adapter {a, s, b} per target, frozen residual base); `key` is unused (the SVD is deterministic)."""
        adapter, frozen, r = {}, base, self.spec.rank
        for t in self.targets:
            w_LIO = self.kernel_matrix(base, t)
            a, s, b = jax.lax.map(lambda m: singular_triplets(m, r), w_LIO)
            merge_into(adapter, t.path, {"a": a.reshape(*t.lead, *t.in_shape, r), "s": s.reshape(*t.lead, r),
                                         "b": b.reshape(*t.lead, r, *t.out_shape)})
            frozen = self._with_kernel(frozen, t, w_LIO - jnp.einsum("lir,lr,lro->lio", a, s, b))
        return adapter, self.frozen_of(frozen)

    def orthonormality(self, adapter: Params) -> jax.Array:
        """sum over targets and layers of ||a^T a - I||_F + ||b b^T - I||_F (f32 scalar)."""
        total = jnp.zeros((), jnp.float32)
        for t in self.targets:
            leaves = get_path(adapter, t.path)
            r = self.spec.rank
            a_LIR = jnp.asarray(leaves["a"], jnp.float32).reshape(-1, math.prod(t.in_shape), r)
            b_LRO = jnp.asarray(leaves["b"], jnp.float32).reshape(-1, r, math.prod(t.out_shape))
            eye = jnp.eye(r, dtype=jnp.float32)
            total += jnp.sum(_frobenius(jnp.einsum("lir,lis->lrs", a_LIR, a_LIR) - eye))
            total += jnp.sum(_frobenius(jnp.einsum("lro,lso->lrs", b_LRO, b_LRO) - eye))
        return total

    def as_lora(self, adapter: Params) -> Params:
        """The adapter as plain LoRA factors of this adapter's spec (s folded into a): a tree `LoraAdapter` exports."""
        out: Params = {}
        for t in self.targets:
            leaves = get_path(adapter, t.path)
            merge_into(out, t.path, {"a": leaves["a"] * leaves["s"].reshape(*t.lead, *([1] * t.n_in), -1),
                                     "b": leaves["b"]})
        return out


def _frobenius(m_LRR: jax.Array) -> jax.Array:
    """Frobenius norm of each [R, R] matrix: [L]; its gradient at 0 is 0 (not NaN)."""
    sq = jnp.sum(jnp.square(m_LRR), axis=(-2, -1))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
