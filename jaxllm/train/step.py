"""The pure train step `(state, batch) -> (state, metrics)` with gradient accumulation."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.language_model import LanguageModel, Params
from jaxllm.losses import loss_from_sums

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (checkpointable), split per step for stochastic layers


def init_state(lm: LanguageModel, tx: optax.GradientTransformation, seed: int) -> TrainState:
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = lm.init(init_key)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(rng))


def make_train_step(
    lm: LanguageModel, tx: optax.GradientTransformation, *, microbatches: int = 1, z_loss: float = 0.0,
    schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure step. The batch ([B, T] arrays) is split into `microbatches` run sequentially
    with `lax.scan`; token-sum losses make the result equal to one step on the whole batch."""

    def sums(params: Params, mb: Batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        ce, zl, n = lm.loss_sums(params, mb)
        return ce + z_loss * zl, (ce, zl, n)

    grad_fn = jax.grad(sums, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        def accumulate(carry, mb):
            g_acc, s_acc = carry
            g, s = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

        if microbatches == 1:
            g_sum, (ce, zl, n) = grad_fn(state.params, batch)
        else:
            split = lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])
            micro = jax.tree.map(split, batch)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (g_sum, (ce, zl, n)), _ = jax.lax.scan(accumulate, (zeros, (0.0, 0.0, 0.0)), micro)
        loss, parts = loss_from_sums(ce, zl, n, z_loss)
        grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), g_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {
            "loss": loss,
            "cross_entropy": parts["cross_entropy"],
            "perplexity": jnp.exp(parts["cross_entropy"]),
            "z_loss": parts["z_loss"],
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "tokens": n,
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return step


def make_eval_step(lm: LanguageModel) -> Callable[[Params, Batch], tuple[jax.Array, jax.Array]]:
    """(params, batch) -> (sum of token losses, token count)."""

    def eval_step(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        ce, _, n = lm.loss_sums(params, batch)
        return ce, n

    return eval_step
