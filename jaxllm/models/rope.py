"""Rotary position embeddings (half-split convention of Llama/HF), with the frequency scalings that extend a
model's context: linear interpolation, NTK-aware, YaRN (Peng et al., 2023) and Llama-3.1's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import RopeScalingConfig


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in radians per position (float64 numpy, computed once)."""
    if scaling.type == "ntk":
        theta = theta * scaling.factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling.type == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif scaling.type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.type == "yarn":
        inv_freq = _yarn_scale(inv_freq, head_dim, theta, scaling)
    return inv_freq


def rope_attention_factor(scaling: RopeScalingConfig) -> float:
    """What cos and sin are multiplied by (so attention logits by its square): YaRN's 0.1 ln(factor) + 1."""
    if scaling.type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def _yarn_scale(inv_freq: np.ndarray, head_dim: int, theta: float, s: RopeScalingConfig) -> np.ndarray:
    """YaRN's NTK-by-parts: pair i keeps its frequency when it turns more than beta_fast times over the original
    context, is divided by `factor` below beta_slow turns, and blends linearly in i between those pairs."""

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times over the context
        return head_dim * math.log(s.original_max_seq_len / (2 * math.pi * turns)) / (2 * math.log(theta))

    lo, hi = pair_turning(s.beta_fast), pair_turning(s.beta_slow)
    if s.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    interpolated = np.clip((np.arange(head_dim // 2) - lo) / max(hi - lo, 1e-3), 0.0, 1.0)  # 0: keep, 1: / factor
    return inv_freq * (1 - interpolated) + inv_freq / s.factor * interpolated


def _llama3_scale(inv_freq: np.ndarray, s: RopeScalingConfig) -> np.ndarray:
    """Llama-3.1: long wavelengths slowed by `factor`, short kept, a smooth blend in between."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return np.where(
        wavelen < high_freq_wavelen, inv_freq, np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, blended)
    )


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotate pairs (i, i + H/2) of each head by angle position * inv_freq[i], times `scale`; math in f32."""
    angles_BTQ = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles_BTQ)[:, :, None, :], jnp.sin(angles_BTQ)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)
