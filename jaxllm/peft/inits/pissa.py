"""PiSSA (Meng et al., 2024) and MiLoRA (Wang et al., 2024): the adapter starts as the principal
(PiSSA) or minor (MiLoRA) rank-r part of W's SVD; the frozen residual holds the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.peft.inits import register


def singular_triplets(w_IO: jax.Array, rank: int, minor: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(U_r [in, r], S_r [r], V_r^T [r, out]): the top (or, `minor`, bottom) rank-r singular triplets of W, f32."""
    if rank > min(w_IO.shape):
        raise ValueError(f"rank {rank} exceeds the smaller side of a {w_IO.shape} matrix")
    u, s, vt = jnp.linalg.svd(w_IO.astype(jnp.float32), full_matrices=False)
    pick = slice(len(s) - rank, None) if minor else slice(0, rank)
    return u[:, pick], s[pick], vt[pick]


def _singular_part(w_IO: jax.Array, rank: int, scale: float, minor: bool):
    u, s, vt = singular_triplets(w_IO, rank, minor)
    root = jnp.sqrt(s / scale)  # s * A @ B == U_r S_r V_r^T
    a = u * root
    b = root[:, None] * vt
    return a, b, w_IO - scale * (a @ b)


@register("pissa")
def pissa(key: jax.Array, w_IO: jax.Array, rank: int, scale: float):
    return _singular_part(w_IO, rank, scale, minor=False)


@register("milora")
def milora(key: jax.Array, w_IO: jax.Array, rank: int, scale: float):
    return _singular_part(w_IO, rank, scale, minor=True)
