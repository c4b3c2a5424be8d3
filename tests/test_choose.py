"""`impl: auto` on a pretend GPU / TPU (the platform monkeypatched): the one decision in
`kernels_pallas.choose` picks cuDNN or Pallas attention by the features a call needs, and the Pallas matmul
kernels only where their plan fits, else XLA with a warning."""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import backend, choose
from jaxllm.models.structured import block_diagonal


@pytest.fixture
def pretend(monkeypatch):
    def set_platform(platform: str):
        monkeypatch.setattr(backend, "current_platform", lambda: platform)
    return set_platform


FEATURES = dict(self_attention=True, packed=False, window=False, softcap=False)


@pytest.mark.parametrize("platform,changes,want", [
    ("gpu", {}, "cudnn"),
    ("gpu", {"packed": True}, "pallas"),
    ("gpu", {"window": True}, "pallas"),
    ("gpu", {"softcap": True}, "pallas"),
    ("gpu", {"self_attention": False}, "xla"),  # decoding against a KV cache
    ("tpu", {}, "pallas"),
    ("tpu", {"packed": True, "softcap": True}, "pallas"),
    ("cpu", {"packed": True}, "xla"),
])
def test_attention_auto(pretend, platform, changes, want):
    pretend(platform)
    assert choose.attention_impl("auto", **{**FEATURES, **changes}) == want
    assert choose.attention_impl("xla", **{**FEATURES, **changes}) == "xla"  # explicit choices are kept


def test_matmul_auto_falls_back_with_one_warning(pretend):
    pretend("gpu")
    assert choose.matmul_impl("auto", what="test kernel", fits=True) == "pallas"
    with pytest.warns(UserWarning, match="test kernel: no Pallas tile plan fits"):
        assert choose.matmul_impl("auto", what="test kernel", fits=False) == "xla"
    pretend("cpu")
    assert choose.matmul_impl("auto", what="grouped matmul", fits=True, cpu="tiled") == "tiled"


@pytest.mark.parametrize("platform,kernel", [("gpu", True), ("tpu", True), ("cpu", False)])
def test_structured_ffn_auto_traces_the_kernel_for_its_target(pretend, platform, kernel):
    """A realistic blockdense factor (4 blocks of 1024 x 602, llama-3-8b at 63%) under auto: on a GPU or
    TPU the block-sparse kernel for that target (lowered, not interpreted), on CPU the batched einsum."""
    pretend(platform)
    x, w = jnp.zeros((256, 4096), jnp.bfloat16), jnp.zeros((4, 1024, 602), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, w: block_diagonal(x, w, "auto"))(x, w).jaxpr
    calls = [e2 for e in jaxpr.eqns if e.primitive.name == "custom_vjp_call"
             for e2 in e.params["call_jaxpr"].jaxpr.eqns if e2.primitive.name == "pallas_call"]
    assert bool(calls) == kernel
    for call in calls:
        assert call.params["interpret"] is False
        params = call.params["compiler_params"]
        assert ("num_warps" in repr(params)) == (platform == "gpu")  # Triton pinned on GPU, Mosaic TPU params on TPU
