"""Next-token cross entropy with a loss mask and optional z-loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def cross_entropy_sums(
    logits_BTV: jax.Array, targets_BT: jax.Array, loss_mask_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over unmasked tokens of -log p(target) and of logsumexp^2, and the token count (f32).

    Sums (not means) so that microbatches add up exactly to the big batch.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    mask_BT = jnp.ones(targets_BT.shape, jnp.float32) if loss_mask_BT is None else loss_mask_BT.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_BT - target_logit_BT) * mask_BT), jnp.sum(jnp.square(lse_BT) * mask_BT), jnp.sum(mask_BT)


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, loss_mask_BT: jax.Array | None = None, z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over unmasked tokens of -log p(target) (+ z_loss * logsumexp^2), computed in f32.

    Returns (loss, metrics) with metrics {cross_entropy, z_loss, tokens}; `loss` includes the z-loss.
    """
    return loss_from_sums(*cross_entropy_sums(logits_BTV, targets_BT, loss_mask_BT), z_loss)


def loss_from_sums(
    ce_sum: jax.Array, z_sum: jax.Array, tokens: jax.Array, z_loss: float = 0.0, aux_sum: jax.Array | float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean cross entropy + z_loss * mean logsumexp^2 + aux_sum / tokens, {cross_entropy, z_loss, aux_loss,
    tokens}) from token sums; `aux_sum`: further loss terms weighted per token (the MoE router losses)."""
    denom = jnp.maximum(tokens, 1.0)
    ce, zl, aux = ce_sum / denom, z_sum / denom, aux_sum / denom
    return ce + z_loss * zl + aux, {"cross_entropy": ce, "z_loss": zl, "aux_loss": aux, "tokens": tokens}


def chunked_cross_entropy_sums(
    hidden_BTD: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets_BT: jax.Array,
    loss_mask_BT: jax.Array | None,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cross_entropy_sums(head(hidden), ...)` computed `chunk` sequence positions at a time.

    Each chunk's logits [B, chunk, V] are rematerialised in the backward pass, so the full f32
    logits [B, T, V] are never held; the price is one more head matmul in the backward pass, so a batch
    that fits one chunk runs unchunked.
    """
    B, T, _ = hidden_BTD.shape
    mask_BT = jnp.ones((B, T), jnp.float32) if loss_mask_BT is None else loss_mask_BT.astype(jnp.float32)
    if chunk >= T:
        return cross_entropy_sums(head(hidden_BTD), targets_BT, mask_BT)
    pad = -T % chunk
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT, mask_BT = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets_BT, mask_BT))
    n = (T + pad) // chunk
    to_chunks = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)  # [n, B, chunk, ...]

    @jax.checkpoint
    def one(h_BTD, t_BT, m_BT):  # one chunk: T = `chunk` positions
        return cross_entropy_sums(head(h_BTD), t_BT, m_BT)

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, one(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero), (to_chunks(hidden_BTD), to_chunks(targets_BT), to_chunks(mask_BT)))
    return sums


def distillation_sums(student_BTV: jax.Array, teacher_BTV: jax.Array, mask_BT: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(soft cross-entropy sum H(p_t, p_s), KL(p_t || p_s) sum, token count) over unmasked positions, in f32, with
    p_t = softmax(teacher logits) (no gradient) and p_s = softmax(student logits). H = KL + the teacher's entropy."""
    log_s = jax.nn.log_softmax(student_BTV.astype(jnp.float32), axis=-1)
    log_t = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_BTV.astype(jnp.float32), axis=-1))
    mask_BT = jnp.ones(log_s.shape[:2], jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    p_t = jnp.exp(log_t)
    soft_ce_BT = -jnp.sum(p_t * log_s, axis=-1)
    kl_BT = jnp.sum(p_t * (log_t - log_s), axis=-1)
    return jnp.sum(soft_ce_BT * mask_BT), jnp.sum(kl_BT * mask_BT), jnp.sum(mask_BT)
