"""Next-token cross entropy with a loss mask and optional z-loss."""

from __future__ import annotations

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
    ce_sum, z_sum, tokens = cross_entropy_sums(logits_BTV, targets_BT, loss_mask_BT)
    denom = jnp.maximum(tokens, 1.0)
    ce, zl = ce_sum / denom, z_sum / denom
    loss = ce + z_loss * zl if z_loss else ce
    return loss, {"cross_entropy": ce, "z_loss": zl, "tokens": tokens}
