"""Optimizers and learning-rate schedules from optax, configured by `TrainConfig`."""

from __future__ import annotations

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
    """True for weights that get weight decay: matrices, not norm scales, biases or embeddings."""

    def wants_decay(path: tuple[Any, ...], _: Any) -> bool:
        name = getattr(path[-1], "key", "")
        owner = getattr(path[-2], "key", "") if len(path) > 1 else ""
        return name == "kernel" or (name == "embedding" and owner == "embed")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt) if cfg.grad_clip > 0 else opt
