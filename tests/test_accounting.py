"""Param count and FLOPs-per-token against a hand calculation."""

import jax
import pytest
from conftest import tiny_model

from jaxllm.config import AttentionConfig, MlpConfig
from jaxllm.language_model import LanguageModel


def test_param_count_and_flops_hand_calculation():
    # V=97, D=32, L=2, N=4 heads, K=2 kv heads, H=8, F=64, gated MLP, untied head, RMSNorm, no bias
    lm = LanguageModel(tiny_model())
    V, D, L, N, K, H, F = 97, 32, 2, 4, 2, 8, 64
    attn = D * N * H + 2 * D * K * H + N * H * D  # q, k, v, o = 1024 + 1024 + 1024
    mlp = 3 * D * F  # gate, up, down = 6144
    norms = 2 * D  # attn_norm, mlp_norm
    expected = V * D + L * (attn + mlp + norms) + D + D * V  # embed, blocks, final norm, head
    assert expected == 3104 + 2 * (3072 + 6144 + 64) + 32 + 3104 == 24800
    assert lm.num_params == expected == sum(x.size for x in jax.tree.leaves(lm.init(jax.random.key(0))))

    T = 16
    matmul = L * (attn + mlp) + D * V  # 2 * 9216 + 3104 = 21536
    mean_keys = (T + 1) / 2  # causal: query i attends i+1 keys
    forward = 2 * matmul + 4 * L * N * H * mean_keys  # 43072 + 256 * 8.5 = 45248
    assert forward == 45248
    assert lm.flops_per_token(T, training=False) == pytest.approx(forward)
    assert lm.flops_per_token(T) == pytest.approx(3 * forward)


def test_flops_tied_gpt2_style_with_window():
    cfg = tiny_model(
        norm="layernorm", position="learned", bias="all", tie_embeddings=True, num_kv_heads=4,
        mlp=MlpConfig(d_ff=64, activation="gelu_tanh", gated=False), attention=AttentionConfig(sliding_window=4),
    )
    lm = LanguageModel(cfg)
    V, D, L, N, H, F, S = 97, 32, 2, 4, 8, 64, 64
    layer = 4 * D * N * H + 3 * N * H + D + 2 * D * F + F + D + 2 * 2 * D  # kernels, biases, 2 LayerNorms
    assert lm.num_params == V * D + S * D + L * layer + 2 * D
    T = 10
    mean_keys = sum(min(i + 1, 4) for i in range(T)) / T  # (1+2+3+4*7)/10 = 3.4
    matmul = L * (4 * D * N * H + 2 * D * F) + D * V  # tied head still costs a matmul
    assert lm.flops_per_token(T, training=False) == pytest.approx(2 * matmul + 4 * L * N * H * mean_keys)


def test_mfu_peak_is_a_record_not_a_new_measurement(tmp_path, monkeypatch):
    """A CPU's peak is measured once and recorded: a later run on a busy machine divides by the same peak."""
    import json

    from jaxllm.train import peak_flops as pf

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    readings = iter([100e9, 40e9])  # an idle machine, then a busy one
    monkeypatch.setattr(pf, "measure_matmul_flops", lambda dtype: next(readings))
    first, second = pf.peak_flops("float32"), pf.peak_flops("float32")
    assert first.flops_per_s == second.flops_per_s == 100e9 * jax.process_count()
    record = json.loads((tmp_path / "peak_flops.json").read_text())[pf.machine_key("float32")]
    assert record["flops_per_s"] == 100e9 and record["measured"] and record["jax"] == jax.__version__
    assert pf.peak_flops("bfloat16").flops_per_s == 40e9  # another dtype: its own measurement
    # accelerators: the datasheet's dense figure for the device kind jax reports
    assert pf.spec_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert pf.spec_peak("NVIDIA H100 PCIe", "float32") == 378e12
    assert (pf.spec_peak("TPU v5 lite", "bfloat16"), pf.spec_peak("TPU v5p", "bfloat16")) == (197e12, 459e12)
    assert pf.spec_peak("AMD EPYC 7B13", "float32") is None
