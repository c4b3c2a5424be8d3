"""RoPE: relative-position property, norm preservation, the context-extension scalings (Llama-3, linear, NTK,
YaRN) against transformers' own rope functions or their formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("params", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0, "beta_slow": 2.0,
     "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "attention_factor": 1.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
], ids=["linear", "yarn", "yarn_betas_untruncated", "yarn_attention_factor", "llama3"])
def test_scaled_frequencies_and_attention_factor_equal_transformers(params):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxllm.interop.hf_mapping import config_from_hf
    from jaxllm.models.rope import rope_attention_factor

    hf = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=32768,
                                  rope_parameters={"rope_theta": 500000.0, **params})
    want_inv, want_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    cfg = config_from_hf(hf.to_dict())
    assert cfg.rope_scaling.type == params["rope_type"]
    inv = rope_inv_freq(128, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(inv, want_inv.double().numpy(), rtol=1e-5)
    assert rope_attention_factor(cfg.rope_scaling) == pytest.approx(want_factor, rel=1e-6)
    if params["rope_type"] != "llama3":
        assert not np.allclose(inv, rope_inv_freq(128, cfg.rope_theta, RopeScalingConfig()))  # it does scale


def test_ntk_scaling_raises_theta_by_the_formula():
    H, theta, factor = 64, 10000.0, 4.0
    inv = rope_inv_freq(H, theta, RopeScalingConfig(type="ntk", factor=factor))
    want = 1.0 / (theta * factor ** (H / (H - 2))) ** (np.arange(0, H, 2) / H)
    np.testing.assert_allclose(inv, want, rtol=1e-12)
    assert inv[0] == 1.0 and inv[-1] == pytest.approx(rope_inv_freq(H, theta, RopeScalingConfig())[-1] / factor, rel=0.05)


def test_yarn_keeps_fast_frequencies_interpolates_slow_ones_and_sharpens_attention():
    from jaxllm.models.rope import rope_attention_factor

    s = RopeScalingConfig(type="yarn", factor=8.0, original_max_seq_len=4096)
    base, scaled = rope_inv_freq(128, 10000.0, RopeScalingConfig()), rope_inv_freq(128, 10000.0, s)
    turns = 4096 * base / (2 * math.pi)  # rotations over the original context
    np.testing.assert_allclose(scaled[turns > 64], base[turns > 64])  # well above beta_fast: kept
    np.testing.assert_allclose(scaled[turns < 0.5], base[turns < 0.5] / 8.0)  # well below beta_slow: interpolated
    assert rope_attention_factor(s) == pytest.approx(0.1 * math.log(8.0) + 1.0)
    q = jnp.ones((1, 1, 1, 128))
    norm = lambda scale: float(jnp.linalg.norm(apply_rope(q, jnp.array([[5]]), scaled, scale)))
    assert norm(1.3) == pytest.approx(1.3 * norm(1.0), rel=1e-5)  # cos and sin scaled: |q| and |k| grow by it
