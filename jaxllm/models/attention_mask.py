"""Which keys a query may attend to, from positions and segment ids: query i sees key j iff they share a segment
id, pos_j <= pos_i (causal) and, with a window W, pos_i - pos_j < W. Any layout of a row works (packed documents,
left padding, a sequence split or permuted over devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free


def attention_mask(
    q_positions_BT: jax.Array,
    kv_positions_BS: jax.Array,
    q_segment_ids_BT: jax.Array,
    kv_segment_ids_BS: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: True where query t may attend to key s."""
    mask = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    delta_BTS = q_positions_BT[:, :, None] - kv_positions_BS[:, None, :]
    if causal:
        mask &= delta_BTS >= 0
    if sliding_window is not None:
        mask &= jnp.abs(delta_BTS) < sliding_window
    return mask
