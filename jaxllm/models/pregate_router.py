"""Read-ME's pre-gating router (Cai et al., 2024): one expert choice per token for every MoE layer, made before the
layer stack from the token id and position alone, so the experts a token needs are known before its forward starts
(what lets a server prefetch experts and batch tokens by expert).

logits = silu(silu(tok[id] + pos[p]) W_h) W_out over the router slots; all f32; the router's own tables (not the
model's embedding). The logits are computed once in `Transformer.run` and carried unchanged through the layer scan
as the MoE layers' router state; each MoE layer takes its top-k. Chosen experts' outputs are added with weight 1
(straight-through: the value is 1, the gradient is that of the router probability), so with every expert chosen
the MoE computes the sum of all experts, and a model refactored from a dense one (`jaxllm.moe.refactor`)
computes the dense FFN exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.models.layers import make_param


class PregateRouter(nnx.Module):
    """(tokens [B, T], positions [B, T]) -> router logits [B, T, Z] (Z router slots), f32."""

    def __init__(self, vocab_size: int, max_seq_len: int, width: int, slots: int, std: float, *, rngs: nnx.Rngs):
        normal, f32 = nnx.initializers.normal, jnp.float32
        self.token = make_param(rngs, normal(1.0), (vocab_size, width), ("vocab", None), f32)
        self.position = make_param(rngs, normal(1.0), (max_seq_len, width), (None, None), f32)
        self.hidden = make_param(rngs, normal(width**-0.5), (width, width), (None, None), f32)
        self.out = make_param(rngs, normal(std), (width, slots), (None, None), f32)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        x_BTR = jax.nn.silu(jnp.take(self.token[...], tokens_BT, axis=0) + jnp.take(self.position[...], positions_BT, axis=0))
        return jnp.dot(jax.nn.silu(jnp.dot(x_BTR, self.hidden[...])), self.out[...])


def unit_weights(probs_MP: jax.Array) -> jax.Array:
    """Weight 1 with the gradient of the chosen experts' router probabilities `probs_MP` (straight-through; not
    renormalised over the chosen ones: with one choice that would be the constant 1, with no gradient)."""
    return 1.0 + probs_MP - jax.lax.stop_gradient(probs_MP)
