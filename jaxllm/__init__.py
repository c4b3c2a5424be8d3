"""jaxllm: language models as pure functions of explicit pytrees, sharded by configuration.

Array names in model code end in their shape, one capital letter per axis, each letter with one meaning:

    B batch rows            T positions (queries)      S key/value positions     D model width
    N query heads           K key/value heads          G query heads per kv head H head dim
    F FFN hidden width      V vocabulary               L layers                  Q rotary frequencies (H / 2)
    M flattened tokens (matmul rows, B * T)            I / O a linear map's input / output features
    R LoRA rank             J diagonal blocks of a structured map
    E experts               C expert capacity          P top-k picks per token   A (token, pick) assignments
    Z router slots (experts + null experts)            U recurrent router state width

e.g. `q_BTNH`, `x_MI`, `expert_MP`, `w_JIO`. `kernels_pallas` keeps the GEMM letters (x_MK @ w_KN -> y_MN).
"""

import importlib

# Exported names load on first use, so `jaxllm` commands start (and re-execute, `jaxllm.host_memory`) before jax loads.
_EXPORTS = {
    "Config": "jaxllm.config",
    "ConfigError": "jaxllm.config",
    "ModelConfig": "jaxllm.config",
    "load_config": "jaxllm.config",
    "validate": "jaxllm.config",
    "LanguageModel": "jaxllm.language_model",
    "Params": "jaxllm.language_model",
    "build": "jaxllm.language_model",
    "cross_entropy": "jaxllm.losses",
    "constrain": "jaxllm.sharding",
    "logical_to_spec": "jaxllm.sharding",
    "make_mesh": "jaxllm.sharding",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
