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
