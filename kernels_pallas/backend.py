"""Which Pallas lowering a kernel targets, and the tile rules and on-chip budgets of each.

A kernel's backend is chosen from the *target* platform, never from the devices a trace happens to run on,
so a kernel can be lowered (`jax.export`) for a GPU or TPU on a CPU-only machine:

- `triton` (GPU: NVIDIA Ampere and Hopper, AMD): pinned with Triton compiler params (jax >= 0.10 would
  otherwise lower through Mosaic GPU). Arrays stay in global memory; programs load tiles in loops.
  Every array in a kernel has power-of-two sizes, `dot` operands >= 16 on each side; on-chip footprint
  ~ num_stages x the tiles loaded per step (shared memory, checked against `GPU_SMEM_BUDGET`).
- `tpu` (Mosaic TPU): blocks copied into VMEM by the grid's pipeline (double-buffered); a block's last two
  dims are multiples of (8, 128) or the whole array dim; reductions run over the innermost grid axis into a
  VMEM scratch accumulator (checked against `TPU_VMEM_BUDGET`).

On CPU the kernels run in interpret mode (`interpret=True` for the Triton-style kernels,
`pltpu.InterpretParams()` for the TPU-style ones). Learned on the way: Mosaic TPU's (8, 128) block rule holds
for SMEM blocks too (per-row tables travel as [B, rows, 1, cols]); `pl.program_id` must be read at a kernel's
top level (the interpreter cannot lower it inside a `lax.cond` branch); Triton's `atomic_add` runs in
interpret mode, so kernels that use it are tested on CPU.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

GPU_PLATFORMS = ("gpu", "cuda", "rocm")
BACKENDS = ("triton", "tpu")
GPU_SMEM_BUDGET = 200 * 1024  # bytes per program; the H100 has 227 KiB, the A100 163 KiB (of 164 + L1)
TPU_VMEM_BUDGET = 16 * 2**20  # bytes per program: the default scoped VMEM limit of v5e and later


def current_platform() -> str:
    """'gpu', 'tpu' or 'cpu' for the default device."""
    platform = jax.devices()[0].platform
    return "gpu" if platform in GPU_PLATFORMS else platform


def backend_for(platform: str) -> str:
    """The kernel style for a platform: 'tpu' on TPU, 'triton' on GPU and (interpreted) on CPU."""
    return "tpu" if platform == "tpu" else "triton"


def resolve(backend: str | None, interpret) -> tuple[str, object]:
    """(backend, interpret) with defaults from the current platform: interpret on CPU (the TPU-style kernels
    with `pltpu.InterpretParams()`), compiled elsewhere."""
    platform = current_platform()
    backend = backend or backend_for(platform)
    if backend not in BACKENDS:
        raise ValueError(f"Pallas backend {backend!r}; choose one of {BACKENDS}")
    if interpret is None:
        interpret = (pltpu.InterpretParams() if backend == "tpu" else True) if platform == "cpu" else False
    return backend, interpret


def compiler_params(backend: str, *, num_warps: int | None = None, num_stages: int | None = None,
                    dimension_semantics: tuple[str, ...] | None = None):
    """Compiler params that pin the lowering: Triton's (warps, pipeline stages) or Mosaic TPU's (which grid
    axes are parallel and which carry a reduction)."""
    if backend == "triton":
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_tile(n: int, cap: int, backend: str) -> int:
    """Tile for n rows, at most `cap`: n rounded up to a power of two for Triton (never below its minimum of 16,
    whatever the cap), to a multiple of 8 for TPU (the caller pads n to a multiple of the tile)."""
    if backend == "triton":
        return max(16, min(1 << (max(cap, 1).bit_length() - 1), pow2_at_least(n)))
    return min(cap, max(8, round_up(n, 8)))


def check_tile(name: str, size: int, backend: str) -> None:
    """Raise a clear error for an explicit tile the backend cannot lower (or, on Triton, would compute
    wrongly: 8-row dots gave silently wrong values on an H100)."""
    if backend == "triton" and (size < 16 or size & (size - 1)):
        raise ValueError(f"{name}={size}: Triton tiles must be powers of two >= 16")
    if backend == "tpu" and size % 8:
        raise ValueError(f"{name}={size}: TPU tiles must be multiples of 8")
