"""Basic layers whose parameters carry logical axis names: dense projections, embeddings, norms."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def make_param(
    rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype
) -> nnx.Param:
    """A Param annotated with logical axis names (sharded later by `jaxllm.sharding` rules)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """y = x . W (+ b), contracting the last len(in_shape) dims of x with W's leading dims.

    W has shape in_shape + out_shape, e.g. (embed, heads, head_dim) for a q projection.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        use_bias: bool,
        std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.n_in = len(in_shape)
        self.dtype = dtype
        shape = tuple(in_shape) + tuple(out_shape)
        self.kernel = make_param(rngs, nnx.initializers.normal(std), shape, axes, param_dtype)
        out_axes = tuple(axes)[self.n_in :]
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, out_shape, out_axes, param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # As one 2-D matmul [tokens, in] @ [in, out]: XLA:CPU runs the backward of a 3-D
        # dot_general ~1.5x slower than the same work flattened (measured, experiments/README.md).
        # The kernel is an array, or an object with `matmul(x [N, in], dtype) -> [N, out]`: a
        # frozen kernel with an adapter or a quantised one (jaxllm.peft), in params trees built for it.
        kernel = self.kernel.get_value()
        out_shape = tuple(kernel.shape[self.n_in :])
        lead = x.shape[: x.ndim - self.n_in]
        x_MI = x.astype(self.dtype).reshape(-1, math.prod(x.shape[x.ndim - self.n_in :]))
        if hasattr(kernel, "matmul"):
            y = kernel.matmul(x_MI, self.dtype)
        else:
            y = x_MI @ kernel.astype(self.dtype).reshape(x_MI.shape[1], -1)
        y = y.reshape(*lead, *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table [vocab, embed]; `attend` reuses it as the output head."""

    def __init__(self, num: int, dim: int, axes: tuple[str, str], *, std: float, dtype, param_dtype, rngs):
        self.dtype = dtype
        self.embedding = make_param(rngs, nnx.initializers.normal(std), (num, dim), axes, param_dtype)

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """x @ embedding.T as one 2-D matmul: [..., D] -> [..., V]."""
        table_VD = self.embedding[...].astype(self.dtype)
        y = x_BTD.astype(self.dtype).reshape(-1, table_VD.shape[1]) @ table_VD.T
        return y.reshape(*x_BTD.shape[:-1], table_VD.shape[0])


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in f32 over the last dim."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, computed in f32 over the last dim."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg: ModelConfig, dim: int, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    cls = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
    return cls(dim, eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
