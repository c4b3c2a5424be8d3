"""Pretraining: every param trains from a fresh initialisation (the base class's answers)."""

from jaxllm.train.methods.method import TrainingMethod
from jaxllm.train.methods.registry import register


@register("pretrain", fine_tuning=False)
class Pretrain(TrainingMethod):
    pass
