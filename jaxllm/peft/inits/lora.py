"""LoRA (Hu et al., 2021): B = 0, so training starts exactly at the base model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.peft.inits import register


@register("lora")
def kaiming_a(key: jax.Array, w_IO: jax.Array, rank: int, scale: float):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's kaiming_uniform(a=sqrt(5)), peft's default), B = 0."""
    bound = 1.0 / jnp.sqrt(w_IO.shape[0])
    a = jax.random.uniform(key, (w_IO.shape[0], rank), jnp.float32, -bound, bound)
    return a, jnp.zeros((rank, w_IO.shape[1]), jnp.float32), w_IO


@register("gaussian")
def gaussian_a(key: jax.Array, w_IO: jax.Array, rank: int, scale: float):
    """A ~ N(0, 1/r), B = 0 (peft's init_lora_weights="gaussian")."""
    a = jax.random.normal(key, (w_IO.shape[0], rank), jnp.float32) / rank
    return a, jnp.zeros((rank, w_IO.shape[1]), jnp.float32), w_IO
