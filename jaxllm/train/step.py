"""The pure train step `(state, batch) -> (state, metrics)` with gradient accumulation."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.language_model import LanguageModel, Params
from jaxllm.losses import loss_from_sums

Batch = dict[str, jax.Array]
# What the model runs on, from the trained params, the frozen params (None when everything trains)
# and a PRNG key for stochastic layers (None when evaluating). Pretraining: the params themselves.
ToModel = Callable[[Params, Any, "jax.Array | None"], Params]
# A method's own loss terms, from the trained and frozen params: {name: scalar}, added to the step's loss once per
# step (regularisers such as SORSA's orthogonality penalty). Logged as `method/<name>`.
Regularizers = Callable[[Params, Any], dict[str, jax.Array]]
# Which entries of the trained params may change: a tree like the params with a 0/1 array (broadcastable to its
# leaf) or None (all of it) per leaf; None for no mask. Masked entries get zero gradient and zero update.
UpdateMask = Callable[[Params], Any]
# What a step minimises on a (micro)batch, from the model's params, the frozen input, the batch and the z-loss weight:
# (total token sum, (cross-entropy sum, logsumexp^2 sum, tokens, router-loss sum), MoE stats) as
# `LanguageModel.objective_sums` returns them.
Objective = Callable[[Params, Any, Batch, float], tuple[jax.Array, tuple[jax.Array, ...], Any]]


def _identity(params: Params, frozen: Any, rng: jax.Array | None) -> Params:
    return params


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
    schedule: optax.Schedule | None = None, to_model: ToModel = _identity, regularizers: Regularizers | None = None,
    update_mask: UpdateMask | None = None, objective: Objective | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure step `(state, batch, frozen=None) -> (state, metrics)`. The batch ([B, T] arrays)
    is split into `microbatches` run sequentially with `lax.scan`; token-sum losses make the result
    equal to one step on the whole batch. Only `state.params` is trained; the model runs on
    `to_model(params, frozen, rng)` (adapters on a frozen base, for fine-tuning). A method's `regularizers` are
    added to the loss once per step; `update_mask` confines the gradient and the update to part of each leaf;
    `objective(model_params, frozen, batch, z_loss)` replaces the next-token objective (`lm.objective_sums`)."""
    if objective is None:
        objective = lambda params, frozen, mb, z: lm.objective_sums(params, mb, z_loss=z)

    def sums(params: Params, frozen: Any, rng: jax.Array, mb: Batch):
        total, parts, stats = objective(to_model(params, frozen, rng), frozen, mb, z_loss)
        return total, (parts, moe_metrics(stats))

    grad_fn = jax.grad(sums, has_aux=True)

    def step(state: TrainState, batch: Batch, frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        next_rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def accumulate(carry, mb_and_key):
            g_acc, s_acc = carry
            mb, key = mb_and_key
            g, (s, moe) = grad_fn(state.params, frozen, key, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), moe

        if microbatches == 1:
            g_sum, ((ce, zl, n, aux), moe) = grad_fn(state.params, frozen, step_rng, batch)
        else:
            split = lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])
            micro = jax.tree.map(split, batch)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            keys = jax.random.split(step_rng, microbatches)
            (g_sum, (ce, zl, n, aux)), moe = jax.lax.scan(accumulate, (zeros, (0.0, 0.0, 0.0, 0.0)), (micro, keys))
            moe = jax.tree.map(lambda x: jnp.mean(x, axis=0), moe)
        loss, parts = loss_from_sums(ce, zl, n, z_loss, aux)
        grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), g_sum)
        terms = {}
        if regularizers is not None:
            (extra, terms), extra_grads = jax.value_and_grad(_summed(regularizers, frozen), has_aux=True)(state.params)
            if terms:
                loss, grads = loss + extra, jax.tree.map(jnp.add, grads, extra_grads)
        mask = None if update_mask is None else update_mask(state.params)
        grads = _masked(grads, mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = _masked(updates, mask)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(next_rng)
        metrics = {
            "loss": loss,
            "cross_entropy": parts["cross_entropy"],
            "perplexity": jnp.exp(parts["cross_entropy"]),
            "z_loss": parts["z_loss"],
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "tokens": n,
        }
        metrics.update(moe)
        metrics.update({f"method/{k}": v for k, v in terms.items()})
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return step


def _summed(regularizers: Regularizers, frozen: Any) -> Callable[[Params], tuple[jax.Array, dict[str, jax.Array]]]:
    """params -> (the sum of the method's loss terms, the terms)."""
    def total(params: Params):
        terms = regularizers(params, frozen)
        return sum(terms.values(), jnp.zeros((), jnp.float32)), terms

    return total


def _masked(tree: Params, mask: Any) -> Params:
    """`tree` with the entries `mask` holds fixed set to zero (mask None, or None at a leaf: nothing fixed)."""
    if mask is None:
        return tree
    return jax.tree.map(lambda x, m: x if m is None else x * m.astype(x.dtype), tree, mask)


def moe_metrics(stats) -> dict[str, jax.Array]:
    """Router metrics of a step, averaged over layers (`moe/expert_load` stays per layer: [L, slots])."""
    if stats is None:
        return {}
    return {"moe/load_balance_loss": jnp.mean(stats.load_balance_loss), "moe/router_z_loss": jnp.mean(stats.router_z_loss),
            "moe/drop_fraction": jnp.mean(stats.drop_fraction), "moe/router_entropy": jnp.mean(stats.router_entropy),
            "moe/expert_flops_per_layer": jnp.mean(stats.expert_flops), "moe/expert_load": stats.expert_load}


def make_eval_step(lm: LanguageModel, to_model: ToModel = _identity) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(params, batch, frozen=None) -> (sum of token losses, token count)."""

    def eval_step(params: Params, batch: Batch, frozen: Any = None) -> tuple[jax.Array, jax.Array]:
        ce, _, n = lm.loss_sums(to_model(params, frozen, None), batch)
        return ce, n

    return eval_step
