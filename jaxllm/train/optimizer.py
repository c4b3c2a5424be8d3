"""Optimizers and learning-rate schedules from optax, configured by `TrainConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jaxllm.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine / linear decay to min_lr_ratio, constant, or
    warmup-stable-decay (MiniCPM's WSD: constant, then a linear decay over the last steps)."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup, rest = cfg.warmup_steps, cfg.steps - cfg.warmup_steps
    ramp = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(rest, 1), alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, max(rest, 1))
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        decay = max(1, int(round(rest * cfg.wsd_decay_fraction)))
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [rest - decay]
        )
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: matrices (kernels, LoRA factors a/b, structured factors
    u/v), not norm scales,
    biases, DoRA magnitudes or embeddings."""

    def wants_decay(path: tuple[Any, ...], _: Any) -> bool:
        name = getattr(path[-1], "key", "")
        owner = getattr(path[-2], "key", "") if len(path) > 1 else ""
        return name in ("kernel", "a", "b", "u", "v") or (name == "embedding" and owner == "embed")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: TrainConfig, b_lr_ratio: float = 1.0) -> optax.GradientTransformation:
    """The configured optimizer with global-norm clipping. `b_lr_ratio` != 1 (LoRA+) gives params
    named `b` (LoRA's B factors) that multiple of the learning rate."""
    if b_lr_ratio != 1.0:
        labels = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "b" if getattr(path[-1], "key", "") == "b" else "rest", params)
        scaled = dataclasses.replace(cfg, learning_rate=cfg.learning_rate * b_lr_ratio)
        inner = optax.multi_transform({"rest": _base_optimizer(cfg), "b": _base_optimizer(scaled)}, labels)
    else:
        inner = _base_optimizer(cfg)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner) if cfg.grad_clip > 0 else inner


def _base_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)
    return opt
