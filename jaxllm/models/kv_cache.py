"""The key/value cache for incremental decoding: a pytree, updated functionally."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


class KVCache(NamedTuple):
    """Keys/values of every layer for S slots, and what each slot holds.

    k, v: [L, B, S, K, H]; positions, segment_ids: [B, S] (segment 0 = empty or padding, never
    attended by real tokens); index: int32 scalar, the next slot to write.
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

    def record(self, positions_BT: jax.Array, segment_ids_BT: jax.Array) -> KVCache:
        """Write the positions/segments of the next T tokens at `index` (layers write k/v)."""
        at = (0, self.index)
        return self._replace(
            positions=jax.lax.dynamic_update_slice(self.positions, positions_BT.astype(jnp.int32), at),
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids_BT.astype(jnp.int32), at),
        )


class LayerCache(NamedTuple):
    """One layer's view: its k/v [B, S, K, H] plus the shared slot metadata (already recorded)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
