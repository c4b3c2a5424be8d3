"""jaxllm: language models as pure functions of explicit pytrees, sharded by configuration."""

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
