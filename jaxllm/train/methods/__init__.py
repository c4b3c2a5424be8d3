"""Training methods, one file each, registered by name (see ARCHITECTURE.md, "Adding a training method")."""

from jaxllm.train.methods import abba, corda, full, hft, lora, miss, mixlora, pretrain, s2ft, self_guided, sorsa  # noqa: F401  (register the built-ins)
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import method_for, register

__all__ = ["Prepared", "TrainingMethod", "method_for", "register"]
