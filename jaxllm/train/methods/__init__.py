"""Training methods, one file each, registered by name (see ARCHITECTURE.md, "Adding a training method")."""

# importing a method's file registers it
from jaxllm.train.methods import (  # noqa: F401
    abba, bottleneck, corda, full, hft, lora, maskllm, miss, mixlora, pregate, pretrain, s2ft, self_guided, sorsa)
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import method_for, register

__all__ = ["Prepared", "TrainingMethod", "method_for", "register"]
