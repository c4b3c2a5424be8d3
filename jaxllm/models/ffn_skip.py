"""FFN-SkipLLM (Jaiswal et al., 2024) while decoding: a layer's FFN is skipped for a token when the FFN of the last
layer that ran it barely turned that token's residual (cosine similarity of the residual before and after it >=
`threshold`). Attention always runs, so the KV cache stays complete; the first `protect_first` and last
`protect_last` layers always run their FFN, and rows still in their warm-up tokens (`active` false) skip nothing.
A batch of one skips for real (`lax.cond`: the saved FLOPs are saved time); a larger batch decides per row and
computes the FFN anyway (`jnp.where`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FfnSkip:
    active: jax.Array  # bool scalar: the warm-up tokens are done
    threshold: float = dataclasses.field(metadata=dict(static=True))
    protect_first: int = dataclasses.field(metadata=dict(static=True), default=1)
    protect_last: int = dataclasses.field(metadata=dict(static=True), default=1)

    def decide(self, layer: jax.Array, num_layers: int, cos_B: jax.Array) -> jax.Array:
        """bool [B]: skip this layer's FFN for each row, given the last computed FFN's cosine [B]."""
        allowed = (layer >= self.protect_first) & (layer < num_layers - self.protect_last) & self.active
        return allowed & (cos_B >= self.threshold)


def cosine_B(a_B1D: jax.Array, b_B1D: jax.Array) -> jax.Array:
    """Cosine similarity per row of one-token hidden states [B, 1, D] -> [B] (f32)."""
    a, b = a_B1D[:, 0].astype(jnp.float32), b_B1D[:, 0].astype(jnp.float32)
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
