"""The one place `impl: auto` is decided for every kernel a model calls: the fastest implementation that
serves the call on the current platform, and never one that cannot compile there.

- attention: cuDNN on a GPU when the call needs only what cuDNN's fused kernel does without a dense mask
  (causal or full attention over unpacked rows); the Pallas flash attention for packed rows (segment ids),
  sliding windows and soft-capping on a GPU, and always on TPU; XLA on CPU and for decoding against a cache.
- matmul kernels (block-sparse, grouped): the Pallas kernel on GPU/TPU when its `plan` fits the on-chip
  budget, else the XLA path with a one-line warning; the XLA path (or the padded-tile grouped matmul) on CPU.
"""

from __future__ import annotations

import warnings

from kernels_pallas import backend


def attention_impl(impl: str, *, self_attention: bool, packed: bool, window: bool, softcap: bool) -> str:
    """xla | pallas | cudnn for one attention call; `impl` other than auto is returned as given."""
    if impl != "auto":
        return impl
    platform = backend.current_platform()
    if platform == "cpu" or not self_attention:
        return "xla"
    if platform == "gpu" and not (packed or window or softcap):
        return "cudnn"
    return "pallas"


_warned: set[str] = set()


def matmul_impl(impl: str, *, what: str, fits: bool, cpu: str = "xla") -> str:
    """pallas | xla (| `cpu`, the CPU path) for one matmul kernel call. `fits`: the kernel's plan for this
    shape stays within the target's on-chip budget."""
    if impl != "auto":
        return impl
    platform = backend.current_platform()
    if platform == "cpu":
        return cpu
    if fits:
        return "pallas"
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"{what}: no Pallas tile plan fits this shape on {platform}; using the XLA path", stacklevel=3)
    return "xla"
