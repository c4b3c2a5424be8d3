"""Every Pallas kernel, forward and backward, lowers for real GPUs (Triton, pinned) and TPUs (Mosaic TPU)
at the shapes the presets use, on this CPU-only machine: `jax.export(..., platforms=[...])` with
`interpret=False` runs Pallas' real lowering, so a kernel that a GPU or TPU would reject fails here.

Triton's lowering emits Triton IR, compiled to PTX only on the GPU (so its shared memory is checked by each
kernel's `plan` budget instead); Mosaic TPU needs chip info, registered for this host as a v5e."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic import tpu_info

from conftest import pallas_block_shapes
from kernels_pallas.block_sparse_matmul import BlockLayout, block_sparse_matmul, plan
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.grouped_matmul import gmm

TRITON_CALL = "__gpu$xla.gpu.triton"
PLATFORM = {"triton": "cuda", "tpu": "tpu"}
CUSTOM_CALL = {"triton": TRITON_CALL, "tpu": "tpu_custom_call"}


@pytest.fixture(autouse=True, scope="module")
def v5e_chip_info():
    """Mosaic TPU asks for the chip it lowers for; on CPU tell it a v5e."""
    kind = jax.devices()[0].device_kind
    tpu_info.registry[kind] = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    yield
    tpu_info.registry.pop(kind, None)


def _export_fwd_bwd(fn, backend: str, *shapes):
    """Export fn and its VJP (forward output kept live, an arbitrary cotangent) for the backend's platform;
    returns the custom-call targets in the module (proving the kernels, not a fallback, were lowered)."""
    def fwd_bwd(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return out, vjp(args[-1])

    exported = jax.export.export(
        jax.jit(fwd_bwd), platforms=[PLATFORM[backend]],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*shapes)
    text = exported.mlir_module()
    return text.count(f"@{CUSTOM_CALL[backend]}(") if backend == "tpu" else text.count(TRITON_CALL)


bf16 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)

# (name, batch, seq, q heads, kv heads, head_dim): llama-3-8b and mixtral-8x7b (32 q / 8 kv heads, head_dim
# 128) and a head_dim-64 model at 4k.
ATTENTION = [("llama-3-8b", 1, 2048, 32, 8, 128), ("head_dim-64", 1, 4096, 32, 8, 64)]


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("name,B,T,N,K,H", ATTENTION, ids=[a[0] for a in ATTENTION])
def test_flash_attention_lowers_with_positions_and_segments(backend, name, B, T, N, K, H):
    def attention(q, k, v, pos, seg):
        return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                               backend=backend, interpret=False)

    fn = lambda q, k, v: attention(q, k, v, jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32))
    calls = _export_fwd_bwd(fn, backend, bf16((B, T, N, H)), bf16((B, T, K, H)), bf16((B, T, K, H)), bf16((B, T, N, H)))
    assert calls == (2 if backend == "triton" else 3)  # forward + fused backward (Triton) / dq + dk/dv (TPU)


# mixtral-8x7b's experts (d_model 4096, d_ff 14336, 8 experts) on 16k routed rows.
@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("K,N", [(4096, 14336), (14336, 4096)], ids=["up", "down"])
def test_grouped_matmul_lowers_at_mixtral_shapes(backend, K, N):
    sizes = jnp.full((8,), 2048, jnp.int32)
    fn = lambda lhs, rhs: gmm(lhs, rhs, sizes, impl="pallas", backend=backend, interpret=False)
    shapes = bf16((16384, K)), bf16((8, K, N)), bf16((16384, N))
    assert _export_fwd_bwd(fn, backend, *shapes) == 3  # gmm, dlhs, tgmm

    def fwd_bwd(lhs, rhs, dout):
        out, vjp = jax.vjp(fn, lhs, rhs)
        return out, vjp(dout)

    blocks = pallas_block_shapes(fwd_bwd, *shapes)
    assert blocks and all(max(block) <= 512 for block, _ in blocks), blocks  # tiles, never a whole K / N strip


def _structured_llama_layouts():
    """Block-diagonal factors of a structured llama-3-8b FFN (d_model 4096, d_ff 14336) at 63% and 32% of
    the dense params (model.mlp.param_fraction), as `structure_sizes` sizes them, plus blockshuffle."""
    from jaxllm.models.structured import structure_sizes
    from jaxllm.config import MlpConfig

    layouts = {}
    for structure in ("blockdense", "blockshuffle"):
        for fraction in (0.63, 0.32):
            sizes = structure_sizes(MlpConfig(d_ff=14336, structure=structure, param_fraction=fraction), 4096, 14336)
            b = sizes.blocks
            width = sizes.rank if structure == "blockdense" else 4096  # blockdense: D -> r, blockshuffle: D -> D
            layouts[f"{structure}-{fraction}"] = BlockLayout.block_diagonal(b, 4096 // b, width // b)
    return layouts


LAYOUTS = {"4x512": BlockLayout.block_diagonal(4, 512, 512), "4x1024": BlockLayout.block_diagonal(4, 1024, 1024),
           "8x512x1408": BlockLayout.block_diagonal(8, 512, 1408), "2x512x235": BlockLayout.block_diagonal(2, 512, 235)}


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("name", sorted(LAYOUTS) + ["structured-llama-3-8b"])
def test_block_sparse_matmul_lowers_within_budget(backend, name):
    layouts = _structured_llama_layouts() if name == "structured-llama-3-8b" else {name: LAYOUTS[name]}
    for layout in layouts.values():
        K, N = layout.shape
        M = 16384
        assert plan(M, layout.block_k, layout.block_n, jnp.bfloat16, backend).fits
        fn = lambda x, b, layout=layout: block_sparse_matmul(x, b, layout, backend=backend, interpret=False)
        shapes = bf16((M, K)), bf16((len(layout.pairs), layout.block_k, layout.block_n)), bf16((M, N))
        assert _export_fwd_bwd(fn, backend, *shapes) == 3  # forward, dX, dW
