"""Kernel throughput: each Pallas kernel against its XLA reference (and cuDNN for attention), in TFLOP/s.

    python experiments/bench_kernels.py                  # GPU/TPU: the full sweep, bf16
    python experiments/bench_kernels.py --quick          # anywhere (CPU: Pallas in interpret mode)

Attention: causal, seq 1k-16k, head_dim 64/128, forward and forward+backward (FLOPs: 4 B N T S_eff H
forward with S_eff the mean keys per query, backward 2.5x forward). Block-sparse: block-diagonal x @ W
at densities 1/2, 1/4, 1/8 against the dense matmul of the same shape (useful FLOPs only, so a perfect
kernel's TFLOP/s equals the dense one's). Grouped matmul: gmm over 8 groups of random sizes against
`lax.ragged_dot`. Writes a markdown table (--out) with the device name; on CPU the Pallas columns are
interpret-mode timings, a smoke test of the script and not a performance number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.train.bench import median_seconds
from kernels_pallas.block_sparse_matmul import BlockLayout, block_sparse_matmul
from kernels_pallas.flash_attention import attention_reference, flash_attention
from kernels_pallas.grouped_matmul import gmm


def measured(kernel: str, shape: str, impl: str, fwd, both, args, flops: float, bwd_factor: float, reps: int):
    """One table row: forward and forward+backward TFLOP/s, or the error that stopped the kernel."""
    try:
        t_f, t_b = median_seconds(fwd, *args, reps=reps), median_seconds(both, *args, reps=reps)
        row = (kernel, shape, impl, f"{flops / t_f / 1e12:.2f}", f"{bwd_factor * flops / t_b / 1e12:.2f}")
    except Exception as err:  # noqa: BLE001 - e.g. out of memory for a materialised reference, a block too big
        row = (kernel, shape, impl, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}", "")
    print(" | ".join(row), flush=True)
    return row


def attention_rows(seqs, head_dims, dtype, reps, batch_tokens):
    on_gpu = jax.devices()[0].platform in ("gpu", "cuda")
    rows = []
    for H in head_dims:
        for T in seqs:
            N, K = 2048 // H if H <= 128 else 8, max(1, (2048 // H) // 4)
            B = max(1, batch_tokens // T)
            rng = np.random.default_rng(0)
            q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
            k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), dtype) for _ in range(2))
            ids = dict(q_positions=jnp.broadcast_to(jnp.arange(T), (B, T)), kv_positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
                       q_segment_ids=jnp.ones((B, T), jnp.int32), kv_segment_ids=jnp.ones((B, T), jnp.int32))
            impls = {"pallas": lambda q, k, v: flash_attention(q, k, v, **ids),
                     "xla": lambda q, k, v: attention_reference(q, k, v, **ids)}
            if on_gpu:
                impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            fwd_flops = 4 * B * N * T * ((T + 1) / 2) * H
            for name, f in impls.items():
                fwd = jax.jit(f)
                both = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                rows.append(measured("attention", f"T={T} H={H} B={B} N={N} K={K}", name, fwd, both, (q, k, v),
                                     fwd_flops, 3.5, reps))
    return rows


def block_sparse_rows(size, dtype, reps):
    rows = []
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((size, size)), dtype)
    dense_w = jnp.asarray(rng.standard_normal((size, size)), dtype)
    dense = jax.jit(lambda x, w: x @ w)
    t = median_seconds(dense, x, dense_w, reps=reps)
    rows.append(("block-sparse", f"{size}^3 dense", "xla dense", f"{2 * size**3 / t / 1e12:.2f}", ""))
    for n in (2, 4, 8):
        layout = BlockLayout.block_diagonal(n, size // n, size // n)
        blocks = jnp.asarray(rng.standard_normal((n, size // n, size // n)), dtype)
        flops = 2 * size**3 / n
        for impl in ("pallas", "xla"):
            f = jax.jit(lambda x, b, impl=impl, layout=layout: block_sparse_matmul(x, b, layout, impl=impl))
            g = jax.jit(jax.grad(lambda x, b, impl=impl, layout=layout: block_sparse_matmul(x, b, layout, impl=impl)
                                 .astype(jnp.float32).sum(), argnums=(0, 1)))
            rows.append(measured("block-sparse", f"{size}^2 x {size}, {n} diagonal blocks (density 1/{n})", impl,
                                 f, g, (x, blocks), flops, 3, reps))
    return rows


def gmm_rows(M, K, N, dtype, reps):
    rng = np.random.default_rng(0)
    sizes = rng.multinomial(M, np.ones(8) / 8).astype(np.int32)
    lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
    rhs = jnp.asarray(rng.standard_normal((8, K, N)), dtype)
    gs = jnp.asarray(sizes)
    rows = []
    for impl in ("pallas", "xla"):
        f = jax.jit(lambda a, b, impl=impl: gmm(a, b, gs, impl=impl))
        g = jax.jit(jax.grad(lambda a, b, impl=impl: gmm(a, b, gs, impl=impl).astype(jnp.float32).sum(), argnums=(0, 1)))
        rows.append(measured("grouped matmul", f"M={M} K={K} N={N}, 8 groups", impl, f, g, (lhs, rhs),
                             2 * M * K * N, 3, reps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU: Pallas runs interpreted)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seqs", type=int, nargs="*", help="attention sequence lengths (default: 1k-16k; quick: 128, 256)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kernels.md"))
    args = ap.parse_args()
    device = jax.devices()[0]
    if args.quick:
        dtype, seqs, head_dims, size, mnk, tokens = jnp.float32, [128, 256], [64], 256, (512, 128, 128), 256
    else:
        dtype, seqs, head_dims, size, mnk, tokens = jnp.bfloat16, [1024, 2048, 4096, 8192, 16384], [64, 128], 4096, (16384, 2048, 2048), 16384
    rows = gmm_rows(*mnk, dtype, args.reps)
    rows += attention_rows(args.seqs or seqs, head_dims, dtype, args.reps, tokens)
    rows += block_sparse_rows(size, dtype, args.reps)
    interpreted = device.platform == "cpu"
    lines = [f"# Kernel throughput on {device.device_kind} ({device.platform}), {jnp.dtype(dtype).name}", "",
             f"`python experiments/bench_kernels.py{' --quick' if args.quick else ''}`, {time.strftime('%Y-%m-%d')}, "
             f"median of {args.reps}. TFLOP/s of useful FLOPs (causal attention counts the attended half)."]
    if interpreted:
        lines.append("On CPU the Pallas kernels run in interpret mode: their timings test the script, not the kernels.")
    lines += ["", "| kernel | shape | impl | forward TFLOP/s | forward+backward TFLOP/s |", "|---|---|---|---:|---:|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
