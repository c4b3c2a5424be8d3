"""Pallas kernels for jaxllm's hot spots, each beside its pure-JAX reference and differentiable through a
`jax.custom_vjp` whose backward pass is also a kernel:

- `flash_attention`: flash attention forward + backward (causal/non-causal, GQA/MQA, segment ids, sliding
  window, soft-cap, any length), `flash_attention_sharded` for meshes; reference `attention_reference`.
- `block_sparse_matmul`: x @ W with W stored as dense blocks in a static `BlockLayout`; forward, dX and dW
  touch only stored blocks; reference `block_sparse_reference`.
- `grouped_matmul`: `gmm` / `tgmm` over rows sorted by group (MoE); reference `jax.lax.ragged_dot`.

Each entry point takes `impl` (xla | pallas | auto: pallas on GPU/TPU, xla on CPU) or, for attention, the
model's `attention.impl`; on CPU the Pallas kernels run with `interpret=True`.
"""
