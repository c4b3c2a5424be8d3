"""The key/value cache for incremental decoding: a pytree, updated functionally."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


class KVCache(NamedTuple):
    """Keys/values of every layer for S slots, and what each slot holds.

    k, v: [L, B, S, K, H]; positions, segment_ids: [B, S] (segment 0 = empty or padding, never
    attended by real tokens); index: int32 scalar, tokens written so far. Token number i lives in
    slot i % S: a sliding-window model keeps only S >= window slots, overwriting the oldest.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: str | None = None) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        zeros_BS = jnp.zeros((batch, length), jnp.int32)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), zeros_BS, zeros_BS, jnp.zeros((), jnp.int32))

    def slots(self, T: int) -> jax.Array:
        """Slots [T] of the next T tokens (T <= S)."""
        return (self.index + jnp.arange(T, dtype=jnp.int32)) % self.positions.shape[1]

    def record(self, positions_BT: jax.Array, segment_ids_BT: jax.Array) -> KVCache:
        """Write the positions/segments of the next T tokens (the layers write their k/v)."""
        slots = self.slots(positions_BT.shape[1])
        return self._replace(
            positions=write_slots(self.positions, slots, positions_BT.astype(jnp.int32)),
            segment_ids=write_slots(self.segment_ids, slots, segment_ids_BT.astype(jnp.int32)),
        )


def write_slots(buf_BS: jax.Array, slots_T: jax.Array, new_BT: jax.Array) -> jax.Array:
    """buf[:, slots] = new along axis 1, for consecutive ring slots.

    A write that does not wrap (every decode step, every prefill into a fresh cache) is an in-place
    dynamic_update_slice; a scatter there made the following decode steps ~1.5x slower on CPU
    (experiments/README.md). Only a multi-token write across the ring's end takes the scatter.
    """
    new_BT = new_BT.astype(buf_BS.dtype)
    start = (0, slots_T[0]) + (0,) * (buf_BS.ndim - 2)
    if slots_T.shape[0] == 1:
        return jax.lax.dynamic_update_slice(buf_BS, new_BT, start)
    fits = slots_T[0] + slots_T.shape[0] <= buf_BS.shape[1]
    return jax.lax.cond(
        fits,
        lambda: jax.lax.dynamic_update_slice(buf_BS, new_BT, start),
        lambda: buf_BS.at[:, slots_T].set(new_BT),
    )


class LayerCache(NamedTuple):
    """One layer's view: its k/v [B, S, K, H], the shared slot metadata (already recorded) and the
    slots [T] this call writes."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    slots: jax.Array


def cache_length(prompt_len: int, max_new_tokens: int, sliding_window: int | None, prefill_chunk: int = 0) -> int:
    """Slots needed: everything, or with a window only max(prompt, window) when the prompt is written at once.
    A prompt written `prefill_chunk` tokens at a time needs window + chunk - 1: a chunk's newest key then never
    overwrites a key that its oldest query still sees."""
    total = prompt_len + max_new_tokens
    if sliding_window is None:
        return total
    if prefill_chunk and prompt_len > prefill_chunk:
        return min(total, sliding_window + prefill_chunk - 1)
    return min(total, max(prompt_len, sliding_window))
