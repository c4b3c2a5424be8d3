"""RoPE: relative-position property, norm preservation, Llama-3 frequency scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import RopeScalingConfig
from jaxllm.models.rope import apply_rope, rope_inv_freq


def test_rope_scores_depend_only_on_relative_position():
    H = 16
    inv = rope_inv_freq(H, 10000.0, RopeScalingConfig())
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, H))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, H))
    score = lambda pq, pk: float(
        jnp.sum(apply_rope(q, jnp.array([[pq]]), inv) * apply_rope(k, jnp.array([[pk]]), inv))
    )
    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-4
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[33]]), inv)), jnp.linalg.norm(q), rtol=1e-5)


def test_rope_half_split_convention_at_position_one():
    # dims (i, i + H/2) rotate together by inv_freq[i] (the Llama / HF rotate_half layout)
    H = 4
    inv = rope_inv_freq(H, 100.0, RopeScalingConfig())
    np.testing.assert_allclose(inv, [1.0, 0.1])
    x = jnp.array([[[[1.0, 0.0, 0.0, 0.0]]]])
    out = apply_rope(x, jnp.array([[1]]), inv)
    np.testing.assert_allclose(out[0, 0, 0], [math.cos(1.0), 0.0, math.sin(1.0), 0.0], atol=1e-6)


def test_llama3_scaling_bands():
    s = RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
    base = rope_inv_freq(128, 500000.0, RopeScalingConfig())
    scaled = rope_inv_freq(128, 500000.0, s)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4  # short wavelengths: unchanged
    low = wavelen > 8192 / 1  # long wavelengths: divided by factor
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0)
    assert np.all((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0))
