"""MaskLLM (Fang et al., 2024): learnable 2:4 masks. Each group of 4 consecutive inputs of a kernel's output picks one
of the 6 patterns keeping 2 of 4; the choice has probabilities softmax(scale * logits) and is sampled differentiably
with Gumbel-softmax at temperature tau while training (the mask is the sampled mix of patterns), and is the argmax
pattern at the end. The weights stay frozen; the logits are what trains.

Logits of a kernel [*lead, *in, *out] are [*lead, *in[:-1], in[-1] / 4, *out, 6]: groups run along the last input
axis (the rows of the [I, O] matrix that `Dense` multiplies by are consecutive along it).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from jaxllm.peft.lora import Target

PATTERNS_KF = jnp.asarray([[float(i in kept) for i in range(4)] for kept in itertools.combinations(range(4), 2)])


def logits_shape(t: Target) -> tuple[int, ...]:
    *rest, last = t.in_shape
    return (*t.lead, *rest, last // 4, *t.out_shape, len(PATTERNS_KF))


def logits_axes(t: Target) -> tuple[str | None, ...]:
    return (*t.axes, None)


def _to_kernel(t: Target, mask_G4: jax.Array) -> jax.Array:
    """[*lead, *in[:-1], G, *out, 4] -> the kernel's shape, the 4 following their group."""
    group_axis = t.n_lead + t.n_in - 1
    return jnp.moveaxis(mask_G4, -1, group_axis + 1).reshape(t.shape)


def hard_mask(t: Target, logits: jax.Array) -> jax.Array:
    """The argmax pattern of every group, as a 0/1 mask shaped like the kernel."""
    return _to_kernel(t, PATTERNS_KF[jnp.argmax(logits, axis=-1)])


def soft_mask(t: Target, logits: jax.Array, key: jax.Array, tau: jax.Array, scale: jax.Array) -> jax.Array:
    """A Gumbel-softmax sample of the patterns' mix: sum_k y_k pattern_k, y = softmax((log p + g) / tau),
    p = softmax(scale * logits), g ~ Gumbel(0, 1); shaped like the kernel (f32)."""
    log_p = jax.nn.log_softmax(scale * logits.astype(jnp.float32), axis=-1)
    y = jax.nn.softmax((log_p + jax.random.gumbel(key, logits.shape)) / tau, axis=-1)
    return _to_kernel(t, y @ PATTERNS_KF)


def prior_logits(t: Target, keep: jax.Array, strength: float, scale: float) -> jax.Array:
    """Logits whose scaled values favour the patterns that overlap a prior 0/1 mask `keep` (shaped like the kernel):
    scale * logit_k = strength * (weights pattern k keeps that the prior keeps) / 2."""
    *rest, last = t.in_shape
    group_axis = t.n_lead + t.n_in - 1
    keep_G4 = jnp.moveaxis(keep.reshape(*t.lead, *rest, last // 4, 4, *t.out_shape), group_axis + 1, -1)
    return strength * (keep_G4.astype(jnp.float32) @ PATTERNS_KF.T) / 2 / scale
