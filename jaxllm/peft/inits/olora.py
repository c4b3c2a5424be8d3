"""OLoRA (Büyükakyüz, 2024): the adapter starts as an orthonormal basis of W's leading columns
(QR of W as torch stores it, [out, in]) times the matching rows of R; the residual holds the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.peft.inits import register


@register("olora")
def olora(key: jax.Array, w_IO: jax.Array, rank: int, scale: float):
    if rank > min(w_IO.shape):
        raise ValueError(f"rank {rank} exceeds the smaller side of a {w_IO.shape} matrix")
    q, r = jnp.linalg.qr(w_IO.T.astype(jnp.float32))  # W_torch [out, in] = Q R
    b = q[:, :rank].T  # lora_B = Q_r [out, r]  ->  ours [r, out]
    a = r[:rank].T  # lora_A = R_r [r, in]    ->  ours [in, r]
    return a, b, w_IO - scale * (a @ b)
