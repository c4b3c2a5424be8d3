"""Tile sizes that each Pallas backend accepts.

Triton (the GPU lowering) wants every array in a kernel to have a power-of-two size and `tl.dot` operands
of at least 16 along each side; TPU and interpret mode take any multiple of 8.
"""

from __future__ import annotations

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def on_gpu() -> bool:
    return jax.devices()[0].platform in GPU_PLATFORMS


def row_tile(n: int, cap: int) -> int:
    """Tile for n rows, at most `cap`: n rounded up to a power of two >= 16 on GPU, to a multiple of 8
    elsewhere (the caller pads n to a multiple of the tile)."""
    if on_gpu():
        return min(cap, max(16, 1 << max(0, n - 1).bit_length()))
    return min(cap, max(8, -(-n // 8) * 8))


def check_gpu_tile(name: str, size: int) -> None:
    """Raise a clear error for an explicit tile Triton cannot lower (or would compute wrongly)."""
    if on_gpu() and (size < 16 or size & (size - 1)):
        raise ValueError(f"{name}={size}: on GPU (Triton) tiles must be powers of two >= 16")
