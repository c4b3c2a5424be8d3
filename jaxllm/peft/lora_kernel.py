"""A frozen kernel with a low-rank adapter, standing in for the kernel array in a params tree.

`Dense` multiplies by any kernel object with a `matmul(x [N, in], dtype) -> [N, out]` method, so
`LanguageModel.apply` runs adapted params unchanged: y = x W + scale * (x A) B, never forming W + sAB
(DoRA forms it once per call for its column norms, as the method requires).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.peft.quantized_kernel import QuantizedKernel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraKernel:
    """base [*in, *out] (an array or QuantizedKernel), a [*in, r], b [r, *out]; DoRA's magnitude [*out]; SORSA's
    singular values `mid` [r] between A and B (y = x W + scale * ((x A) * mid) B).

    Leaves may carry extra leading (stacked-layer) axes; `matmul` runs on one layer's slice.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    magnitude: jax.Array | None = None
    mid: jax.Array | None = None
    dropout_key: jax.Array | None = None  # typed PRNG key; None: no dropout (evaluation)
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def base_matrix(self, dtype: jnp.dtype) -> jax.Array:
        """The frozen kernel as a matrix [in, out] in `dtype`."""
        return dense_matrix(self.base, self.b.size // self.b.shape[0], dtype)

    def delta_matrix(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """scale * A @ B (scale * A diag(mid) B) as a matrix [in, out]."""
        a = self.a.reshape(-1, self.a.shape[-1]).astype(dtype)
        if self.mid is not None:
            a = a * self.mid.reshape(-1).astype(dtype)
        return self.scale * (a @ self.b.reshape(self.b.shape[0], -1).astype(dtype))

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        w_IO = self.base_matrix(dtype)
        a_IR = self.a.reshape(w_IO.shape[0], -1).astype(dtype)
        b_RO = self.b.reshape(a_IR.shape[1], -1).astype(dtype)
        y_MO = x_MI @ w_IO
        xd_MI = x_MI
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1 - self.dropout, x_MI.shape)
            xd_MI = jnp.where(keep, x_MI / (1 - self.dropout), 0).astype(dtype)
        xa_MR = xd_MI @ a_IR
        if self.mid is not None:
            xa_MR = xa_MR * self.mid.reshape(-1).astype(dtype)
        lora_MO = self.scale * (xa_MR @ b_RO)
        if self.magnitude is None:
            return y_MO + lora_MO
        # DoRA: magnitude * (W + sAB) / ||W + sAB||_col, the norm held constant in the backward
        # pass (DoRA section 4.3, as peft does). With dropout only the adapter's input is dropped.
        norm_O = jax.lax.stop_gradient(column_norm(w_IO.astype(jnp.float32) + self.delta_matrix(jnp.float32)))
        g_O = (self.magnitude.reshape(-1).astype(jnp.float32) / norm_O).astype(dtype)
        base_d_MO = y_MO if xd_MI is x_MI else xd_MI @ w_IO
        return y_MO + (g_O - 1) * base_d_MO + g_O * lora_MO


def dense_matrix(kernel: Any, out_size: int, dtype: jnp.dtype) -> jax.Array:
    """A frozen kernel (an array or QuantizedKernel) [*in, *out] as a matrix [in, out_size] in `dtype`."""
    w = kernel.dequantize(dtype) if isinstance(kernel, QuantizedKernel) else kernel.astype(dtype)
    return w.reshape(-1, out_size)


def column_norm(w_IO: jax.Array) -> jax.Array:
    """L2 norm of each output column of a [in, out] matrix: [out]."""
    return jnp.sqrt(jnp.sum(jnp.square(w_IO), axis=0))
