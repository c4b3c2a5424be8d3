"""Training methods by name: `finetune.method` picks a fine-tuning method; a run without `finetune.base` is
pretraining (self-guided when `model.mlp.guide_fraction > 0`)."""

from __future__ import annotations

from typing import Callable

from jaxllm import config as config_module
from jaxllm.config import Config, ConfigError
from jaxllm.language_model import LanguageModel
from jaxllm.train.methods.method import TrainingMethod

_METHODS: dict[str, type[TrainingMethod]] = {}


def register(name: str, fine_tuning: bool = True) -> Callable[[type[TrainingMethod]], type[TrainingMethod]]:
    """Class decorator: the method called `name` (a `finetune.method` value when `fine_tuning`)."""
    def add(cls: type[TrainingMethod]) -> type[TrainingMethod]:
        _METHODS[name] = cls
        if fine_tuning and name not in config_module.FINETUNE_METHODS:
            config_module.FINETUNE_METHODS.append(name)
        return cls

    return add


def method_for(cfg: Config, lm: LanguageModel) -> TrainingMethod:
    """The method object that trains `lm` as `cfg` says."""
    if cfg.finetune.base:
        name = cfg.finetune.method
    else:
        name = "self_guided" if cfg.model.mlp.guide_fraction > 0 else "pretrain"
    if name not in _METHODS:
        raise ConfigError(f"finetune.method={name!r} is not a registered method; choose one of {sorted(_METHODS)}")
    return _METHODS[name](cfg, lm)
