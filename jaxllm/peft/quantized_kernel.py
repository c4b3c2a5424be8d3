"""Frozen kernels stored as int8 or 4-bit NormalFloat (QLoRA's NF4), dequantised on the fly.

A kernel [..., N] is cut along its last axis into blocks of `block` values; each block keeps one f32
scale (its absmax) and a code per value: int8 (value / absmax * 127, rounded) or the index of the
nearest of NF4's 16 levels (two codes per byte). Leading axes, the stacked `layers` one included, are
kept, so a quantised kernel is sliced by `lax.scan` and sharded like the kernel it replaces.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (Dettmers et al., 2023).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """codes [..., N / block, block] int8 (nf4: [..., N / block, block / 2] uint8), scales [..., N / block] f32."""

    codes: jax.Array
    scales: jax.Array
    kind: str = dataclasses.field(metadata=dict(static=True), default="int8")

    @property
    def shape(self) -> tuple[int, ...]:
        per_block = self.codes.shape[-1] * (2 if self.kind == "nf4" else 1)
        return (*self.codes.shape[:-2], self.codes.shape[-2] * per_block)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float32)

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        if self.kind == "int8":
            unit = self.codes.astype(jnp.float32) / 127.0
        else:
            hi, lo = self.codes >> 4, self.codes & 0x0F
            idx = jnp.stack([hi, lo], axis=-1).reshape(*self.codes.shape[:-1], -1)
            unit = jnp.asarray(NF4_LEVELS, jnp.float32)[idx]
        return (unit * self.scales[..., None]).reshape(self.shape).astype(dtype)

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """x [N, in] @ kernel viewed as [in, out] (the kernel minus its leading `in` dims)."""
        kernel = self.dequantize(dtype)
        return x_MI @ kernel.reshape(x_MI.shape[-1], -1)


def block_size(last_dim: int, block: int, kind: str) -> int:
    """The largest block <= `block` dividing the kernel's last axis (even for nf4's two codes per byte)."""
    for b in range(min(block, last_dim), 0, -1):
        if last_dim % b == 0 and (kind != "nf4" or b % 2 == 0):
            return b
    raise ValueError(f"no {kind} block size divides a last axis of {last_dim}")


def quantize(kernel: jax.Array, kind: str, block: int = 64) -> QuantizedKernel:
    """Quantise a float kernel [..., N] blockwise along its last axis (`kind`: int8 | nf4)."""
    if kind not in ("int8", "nf4"):
        raise ValueError(f"quantisation kind {kind!r}; supported: int8, nf4")
    b = block_size(kernel.shape[-1], block, kind)
    blocks = kernel.astype(jnp.float32).reshape(*kernel.shape[:-1], kernel.shape[-1] // b, b)
    scales = jnp.max(jnp.abs(blocks), axis=-1)
    unit = blocks / jnp.where(scales == 0, 1.0, scales)[..., None]
    if kind == "int8":
        codes = jnp.round(unit * 127.0).astype(jnp.int8)
    else:
        idx = jnp.argmin(jnp.abs(unit[..., None] - jnp.asarray(NF4_LEVELS, jnp.float32)), axis=-1).astype(jnp.uint8)
        pairs = idx.reshape(*idx.shape[:-1], b // 2, 2)
        codes = (pairs[..., 0] << 4) | pairs[..., 1]
    return QuantizedKernel(codes, scales, kind)


def quantized_logical_axes(axes: tuple[str | None, ...], kind: str) -> QuantizedKernel:
    """Logical axis names of a quantised kernel's leaves (same tree structure), from the float kernel's."""
    return QuantizedKernel(codes=(*axes, None), scales=tuple(axes), kind=kind)  # type: ignore[arg-type]


def num_bytes(q: QuantizedKernel) -> int:
    return int(math.prod(q.codes.shape)) * q.codes.dtype.itemsize + int(math.prod(q.scales.shape)) * 4
