"""Pallas kernels for jaxllm's hot spots, each beside its pure-JAX reference and differentiable through a
`jax.custom_vjp` whose backward pass is also a kernel:

- `flash_attention`: flash attention forward + backward (causal/non-causal, GQA/MQA, segment ids, sliding
  window, soft-cap, any length; block classes skip / full / partial), `flash_attention_sharded` for meshes;
  reference `attention_reference`.
- `block_sparse_matmul`: x @ W with W stored as dense blocks in a static `BlockLayout`, tiled independently
  of the block size (`plan`); forward, dX and dW touch only stored blocks; reference `block_sparse_reference`.
- `grouped_matmul`: `gmm` / `tgmm` over rows sorted by group (MoE); reference `jax.lax.ragged_dot`.

`backend` says which lowering each kernel is written for (Triton on GPU, Mosaic TPU) and its tile rules
and on-chip budgets; `choose` is the one place `impl: auto` is decided. On CPU the kernels run in
interpret mode.
"""
