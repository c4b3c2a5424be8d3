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

from jaxllm.config import Config, ConfigError, ModelConfig, load_config, validate
from jaxllm.language_model import LanguageModel, Params, build
from jaxllm.losses import cross_entropy
from jaxllm.sharding import constrain, logical_to_spec, make_mesh

__all__ = [
    "Config",
    "ConfigError",
    "LanguageModel",
    "ModelConfig",
    "Params",
    "build",
    "constrain",
    "cross_entropy",
    "load_config",
    "logical_to_spec",
    "make_mesh",
    "validate",
]
__version__ = "0.1.0"
