"""Methods that add modules to a frozen base (MixLoRA's router and LoRA experts, bottleneck adapters): the run's model
is the base's architecture plus the modules one `ModelConfig` field adds; the new params train, the base's are held
fixed; the run's checkpoints hold the whole model (its config names the added modules)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.train.methods.base_model import Base, fresh_copies, with_execution_of
from jaxllm.train.methods.method import Prepared, TrainingMethod


def overlay(fresh: Any, base: Mapping[str, Any]) -> Any:
    """`fresh` (params of the grown model) with every param the base has replaced by the base's."""
    if isinstance(fresh, dict):
        return {k: overlay(v, base[k]) if k in base else v for k, v in fresh.items()}
    return base


def split_added(tree: Any, base: Mapping[str, Any]) -> tuple[Any, Any]:
    """(leaves absent from `base`, leaves present in it): two trees shaped like `tree`, None where a leaf is in the
    other. `tree` is params of the grown model or a tree shaped like them (shardings)."""
    def split(node, base_node):
        if isinstance(node, dict):
            parts = {k: split(v, base_node.get(k) if base_node is not None else None) for k, v in node.items()}
            return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
        return (node, None) if base_node is None else (None, node)

    return split(tree, base)


def join(trained: Any, frozen: Any) -> Any:
    """The model's params from `split_added`'s halves."""
    return jax.tree.map(lambda a, b: b if a is None else a, trained, frozen, is_leaf=lambda x: x is None)


class AddedModules(TrainingMethod):
    """Fine-tunes the modules that `cfg.model.<added>` adds to the base (`finetune.base`); a subclass names the field
    and says whether a base already has such modules."""

    added = ""  # the ModelConfig field describing the added modules

    def base_has_added(self, base_cfg: ModelConfig) -> bool:
        raise NotImplementedError

    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        cfg, lm = self.cfg, self.lm
        plain = dataclasses.replace(cfg.model, **{self.added: getattr(base.cfg, self.added)})  # compare all but these
        if with_execution_of(base.cfg, plain) != plain or self.base_has_added(base.cfg):
            raise ConfigError(f"finetune.method={cfg.finetune.method} needs a base with this architecture and without "
                              f"model.{self.added} modules; {cfg.finetune.base!r} differs")
        placed = jax.device_put(base.params, LanguageModel(plain, lm.rules).param_shardings(mesh))
        shardings = lm.param_shardings(mesh)
        params = jax.jit(lambda b, k: overlay(lm.init(k), b), out_shardings=shardings)(placed, key)
        trained, frozen = split_added(params, base.params)
        trained_shardings = split_added(shardings, base.params)[0]
        return Prepared(fresh_copies(trained, trained_shardings), trained_shardings, frozen)

    def to_model(self, trained: Params, frozen: Params, rng: jax.Array | None) -> Params:
        return join(trained, frozen)
