"""Self-guided structured training (Building on Efficient Foundations, section 4): each structured FFN map runs
beside a dense guide weighted by a, which decays from 1 to 0 over `model.mlp.guide_fraction` of the steps; then the
guides are dropped and training continues on the structured model alone (the next phase)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxllm.config import Config
from jaxllm.language_model import LanguageModel, Params
from jaxllm.models.structured import drop_guides, guide_alpha, with_guide
from jaxllm.train.methods.method import TrainingMethod
from jaxllm.train.methods.registry import register


def guide_decay_steps(cfg: Config) -> int:
    """Steps over which the self-guided weight a decays to 0 (then the guides are dropped)."""
    return max(1, round(cfg.model.mlp.guide_fraction * cfg.train.steps))


def without_guides(cfg: Config) -> Config:
    """The config of the run after its self-guided phase: the same model without dense guides."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, mlp=dataclasses.replace(cfg.model.mlp, guide_fraction=0.0)))


@register("self_guided", fine_tuning=False)
class SelfGuided(TrainingMethod):
    """The step's fixed input is the guide weight a (a float32 scalar), not frozen params."""

    phase_note = "self-guided phase over, dense guides dropped"

    def __init__(self, cfg: Config, lm: LanguageModel):
        super().__init__(cfg, lm)
        mlp = cfg.model.mlp
        self.alpha = functools.partial(guide_alpha, decay_steps=guide_decay_steps(cfg), schedule=mlp.guide_schedule)
        self.sampled = mlp.guide_sampled

    def to_model(self, trained: Params, a: jax.Array, rng: jax.Array | None) -> Params:
        return with_guide(trained, a, rng, self.sampled)

    def frozen_at(self, frozen: None, step: int) -> jax.Array:
        return jnp.float32(self.alpha(step))

    def step_metrics(self, step: int) -> dict[str, float]:
        return {"guide_alpha": self.alpha(step)}

    def phase_end(self) -> int:
        return guide_decay_steps(self.cfg)

    def next_config(self) -> Config:
        return without_guides(self.cfg)

    def carry_over(self, trained_tree):
        return drop_guides(trained_tree)
