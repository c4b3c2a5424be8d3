"""ABBA (Singhal et al., 2025): the update of a target W [in, out] is the Hadamard product of two independently
learned low-rank matrices, Delta W = s (A1 B1) * (A2 B2) with A [in, r], B [r, out] (peft's LoHa has the same form).

Applied without forming Delta W, through the Khatri-Rao identity (A1 B1) * (A2 B2) = (A1 . A2) (B1 . B2), where
A1 . A2 [in, r^2] takes row-wise products and B1 . B2 [r^2, out] column-wise ones: y = x W + s (x (A1 . A2)) (B1 . B2).
Init as the paper: A1 B1 is W's principal rank-r part (A1 = U_r sqrt(S_r), B1 = sqrt(S_r) V_r^T), A2 is Kaiming
uniform as LoRA's A, B2 = 0, so training starts at the base (which stays whole: nothing is moved out of W). The scale
s is LoRA's (`alpha / rank`, or `alpha / sqrt(rank)` with `rslora`); rank, targets and quantisation from
`finetune.lora`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import LoraConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into, replace_path
from jaxllm.peft.inits import INITS
from jaxllm.peft.lora import LoraAdapter, Target
from jaxllm.peft.lora_kernel import dense_matrix


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AbbaKernel:
    """base [*in, *out] (an array or QuantizedKernel), a1, a2 [*in, r], b1, b2 [r, *out]; leaves may carry leading
    stacked-layer axes, `matmul` runs on one layer's slice."""

    base: Any
    a1: jax.Array
    b1: jax.Array
    a2: jax.Array
    b2: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def factors(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """(A1 . A2 [in, r^2], B1 . B2 [r^2, out]): the Khatri-Rao factors of (A1 B1) * (A2 B2)."""
        r = self.a1.shape[-1]
        a1, a2 = (x.reshape(-1, r).astype(dtype) for x in (self.a1, self.a2))
        b1, b2 = (x.reshape(r, -1).astype(dtype) for x in (self.b1, self.b2))
        kr_a = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], r * r)
        return kr_a, (b1[:, None] * b2[None]).reshape(r * r, -1)

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        kr_a, kr_b = self.factors(dtype)
        w_IO = dense_matrix(self.base, kr_b.shape[1], dtype)
        return x_MI @ w_IO + self.scale * ((x_MI @ kr_a) @ kr_b)


class AbbaAdapter(LoraAdapter):
    """ABBA adapters {a1, b1, a2, b2} on the linear maps `spec.targets` names; merge / unmerge as LoRA's."""

    def __init__(self, lm: LanguageModel, spec: LoraConfig):
        super().__init__(lm, dataclasses.replace(spec, init="lora", dora=False))

    def _leaf_specs(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
        lora = super()._leaf_specs(t)
        return {"a1": lora["a"], "b1": lora["b"], "a2": lora["a"], "b2": lora["b"]}

    def init(self, key: jax.Array, base: Params) -> tuple[Params, Params]:
        """(adapter: A1 B1 = W's principal rank-r part, A2 Kaiming, B2 = 0; the frozen base, unchanged)."""
        adapter: Params = {}
        r = self.spec.rank
        for i, t in enumerate(self.targets):
            w_LIO = self.kernel_matrix(base, t)
            keys = jax.random.split(jax.random.fold_in(key, i), w_LIO.shape[0])
            a1, b1, _ = jax.lax.map(lambda m: INITS["pissa"](None, m, r, 1.0), w_LIO)  # U_r sqrt(S_r), sqrt(S_r) V_r^T
            a2 = jax.lax.map(lambda km: INITS["lora"](km[0], km[1], r, self.scale)[0], (keys, w_LIO))
            merge_into(adapter, t.path, {
                "a1": a1.reshape(*t.lead, *t.in_shape, r), "b1": b1.reshape(*t.lead, r, *t.out_shape),
                "a2": a2.reshape(*t.lead, *t.in_shape, r), "b2": jnp.zeros((*t.lead, r, *t.out_shape), jnp.float32)})
        return adapter, self.frozen_of(base)

    def apply(self, frozen: Params, adapter: Params, rng: jax.Array | None = None) -> Params:
        params = frozen
        for t in self.targets:
            leaves = get_path(adapter, t.path)
            kernel = AbbaKernel(get_path(frozen, t.path + ("kernel",)), leaves["a1"], leaves["b1"], leaves["a2"],
                                leaves["b2"], self.scale)
            params = replace_path(params, t.path + ("kernel",), kernel)
        return params

    def delta(self, w_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """s (A1 B1) * (A2 B2) [L, I, O]."""
        a = lambda k: jnp.asarray(leaves[k], jnp.float32).reshape(w_LIO.shape[0], w_LIO.shape[1], -1)
        b = lambda k: jnp.asarray(leaves[k], jnp.float32).reshape(w_LIO.shape[0], -1, w_LIO.shape[2])
        return self.scale * jnp.einsum("lir,lro->lio", a("a1"), b("b1")) * jnp.einsum("lir,lro->lio", a("a2"), b("b2"))

    def flops_per_token(self) -> int:
        """6 per weight of the Khatri-Rao factors [in, r^2] and [r^2, out] (forward, input and weight gradients)."""
        r = self.spec.rank
        sides = sum(math.prod(t.lead) * (math.prod(t.in_shape) + math.prod(t.out_shape)) for t in self.targets)
        return 6 * r * r * sides
