"""Layer-wise recurrent router (RMoE, Qiu et al. 2024): a GRU cell carries each token's router state from
one MoE layer to the next, so a layer's routing can depend on the choices made below it.

Per layer: h' = GRU(h, x W_in) with x the layer's FFN input [M, D] (M tokens) and h [M, U] the state from the layer
below (zeros at the first); logits = h' W_out over the router slots. All in f32. Each layer has its own GRU
weights (the blocks are stacked per layer); the state is per token and per forward pass (decoding starts
each token at zeros, no cache needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.models.layers import make_param


class RecurrentRouter(nnx.Module):
    """(x [M, D], h [M, U]) -> (logits [M, Z], h' [M, U]) (Z router slots)."""

    def __init__(self, d_model: int, state_dim: int, slots: int, std: float, *, rngs: nnx.Rngs):
        normal = nnx.initializers.normal
        f32 = jnp.float32
        self.w_in = make_param(rngs, normal(std), (d_model, state_dim), ("embed", None), f32)
        self.w_x = make_param(rngs, normal(state_dim**-0.5), (state_dim, 3 * state_dim), (None, None), f32)
        self.w_h = make_param(rngs, normal(state_dim**-0.5), (state_dim, 3 * state_dim), (None, None), f32)
        self.bias = make_param(rngs, nnx.initializers.zeros, (3 * state_dim,), (None,), f32)
        self.w_out = make_param(rngs, normal(std), (state_dim, slots), (None, None), f32)

    def __call__(self, x_MD: jax.Array, h_MU: jax.Array) -> tuple[jax.Array, jax.Array]:
        u = jnp.dot(x_MD.astype(jnp.float32), self.w_in[...])
        gx = jnp.dot(u, self.w_x[...]) + self.bias[...]
        gh = jnp.dot(h_MU, self.w_h[...])
        xz, xr, xn = jnp.split(gx, 3, axis=-1)
        hz, hr, hn = jnp.split(gh, 3, axis=-1)
        z, r = jax.nn.sigmoid(xz + hz), jax.nn.sigmoid(xr + hr)
        h_new = (1 - z) * jnp.tanh(xn + r * hn) + z * h_MU
        return jnp.dot(h_new, self.w_out[...]), h_new
