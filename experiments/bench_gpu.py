"""The GPU benchmark: jaxllm's kernels, structured FFNs and a ~1B Llama train step against the baselines a
user would really run, in one command (< 8 minutes on one H100/H200).

    python experiments/bench_gpu.py            # on a GPU: writes experiments/results/bench_gpu_<device>.{md,json}
    python experiments/bench_gpu.py --smoke    # anywhere, tiny shapes (CPU: Pallas interpreted; a test, not a number)

Every forward+backward time keeps the forward output live and pulls a random cotangent through the VJP
(`jax.grad` of a sum would let XLA drop the forward). Median of `--reps` runs after a warm-up. Rows:
- block-diagonal matmul (M=16384; K=N=4096 and 8192 at 2-32 blocks; the block-diagonal factors of
  structured FFNs at d_model 2048, d_ff 8192, 63% / 32% of params): the Pallas kernel vs the batched einsum
  the model runs on XLA vs the dense matmul of the same K x N, useful TFLOP/s;
- one FFN layer (SwiGLU, d_model 2048, d_ff 8192, 16k tokens) and a whole ~1B Llama train step, dense vs
  lowrank / blockdense / blockshuffle at 63% and 32%: speedups over dense;
- flash attention vs cuDNN (`jax.nn.dot_product_attention`), causal, T = 2k/4k/8k, head_dim 64 (32 q / 8 kv
  heads) and 128 (16 / 4), one document per row and 8 documents per row (cuDNN then gets the same mask);
- the ~1B dense train step with attention.impl pallas vs cudnn: tokens/s and MFU against the device's bf16
  dense peak.
"""

from __future__ import annotations

import argparse
import json
import platform as host
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import MlpConfig, load_config
from jaxllm.models.attention import attention_mask
from jaxllm.models.mlp import Mlp
from jaxllm.models.structured import block_diagonal, structure_sizes
from jaxllm.train.bench import bench, median_seconds
from jaxllm.train.peak_flops import spec_peak
from kernels_pallas.flash_attention import flash_attention

STRUCTURES = [("dense", 1.0), ("lowrank", 0.63), ("lowrank", 0.32), ("blockdense", 0.63), ("blockdense", 0.32),
              ("blockshuffle", 0.63), ("blockshuffle", 0.32)]


def fwd_bwd(fn):
    """jit of (args..., cotangent) -> (output, input gradients): the forward stays live."""
    def run(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return out, vjp(args[-1])
    return jax.jit(run)


def timed(fn, args, reps: int) -> float | str:
    try:
        return median_seconds(fn, *args, reps=reps)
    except Exception as err:  # noqa: BLE001 - a row that fails is reported as failed, never dropped
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}"


def tflops(flops: float, t) -> float | str:
    return round(flops / t / 1e12, 2) if isinstance(t, float) else t


def randn(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def block_diagonal_rows(M, shapes, dtype, reps):
    """Pallas kernel vs batched einsum vs dense, forward and forward+backward, useful TFLOP/s."""
    rng, rows = np.random.default_rng(0), []
    for label, b, i, o in shapes:
        x, w, ct = randn(rng, (M, b * i), dtype), randn(rng, (b, i, o), dtype), randn(rng, (M, b * o), dtype)
        dense_w = randn(rng, (b * i, b * o), dtype)
        flops = 2 * M * b * i * o
        row = {"shape": label, "M": M, "blocks": b, "block": f"{i}x{o}"}
        for impl in ("pallas", "xla"):
            f = lambda x, w, impl=impl: block_diagonal(x, w, impl)
            row[f"{impl}_fwd"] = tflops(flops, timed(jax.jit(f), (x, w), reps))
            row[f"{impl}_fwd_bwd"] = tflops(3 * flops, timed(fwd_bwd(f), (x, w, ct), reps))
        dense = lambda x, w: x @ w
        row["dense_fwd"] = tflops(2 * M * b * i * b * o, timed(jax.jit(dense), (x, dense_w), reps))
        row["dense_fwd_bwd"] = tflops(6 * M * b * i * b * o, timed(fwd_bwd(dense), (x, dense_w, ct), reps))
        print(row, flush=True)
        rows.append(row)
    return rows


def ffn_rows(D, F, tokens, dtype, reps):
    """One SwiGLU FFN layer per structure: forward+backward seconds and speedup over dense."""
    from flax import nnx

    base = load_config([], [f"model.d_model={D}", f"model.mlp.d_ff={F}", f"model.dtype={jnp.dtype(dtype).name}"])
    x = randn(np.random.default_rng(0), (1, tokens, D), dtype)
    rows = []
    for structure, fraction in STRUCTURES:
        mlp_cfg = MlpConfig(d_ff=F, structure=structure, param_fraction=fraction)
        cfg = base.model.__class__(**{**base.model.__dict__, "mlp": mlp_cfg})
        graphdef, params = nnx.split(Mlp(cfg, (), rngs=nnx.Rngs(0)))
        f = lambda p, x, graphdef=graphdef: nnx.merge(graphdef, p)(x)
        t = timed(fwd_bwd(f), (params, x, x), reps)
        rows.append({"structure": structure, "param_fraction": fraction,
                     "fwd_bwd_s": round(t, 6) if isinstance(t, float) else t})
    dense = rows[0]["fwd_bwd_s"]
    for r in rows:
        r["speedup"] = round(dense / r["fwd_bwd_s"], 2) if isinstance(r["fwd_bwd_s"], float) and isinstance(dense, float) else ""
        print(r, flush=True)
    return rows


def attention_rows(seqs, head_dims, tokens, dtype, reps, cudnn: bool):
    rng, rows = np.random.default_rng(0), []
    for H in head_dims:
        N, K = (32, 8) if H == 64 else (16, 4)
        for T in seqs:
            B = max(1, tokens // T)
            q, k, v = randn(rng, (B, T, N, H), dtype), randn(rng, (B, T, K, H), dtype), randn(rng, (B, T, K, H), dtype)
            for docs in (1, 8):
                seg = jnp.asarray(np.repeat(np.arange(1, docs + 1), -(-T // docs))[:T][None].repeat(B, 0), jnp.int32)
                pos = jnp.asarray(np.concatenate([np.arange(n) for n in np.bincount(np.asarray(seg[0]))[1:]])[None].repeat(B, 0))
                ids = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
                attended = float(np.asarray(attention_mask(pos[:1], pos[:1], seg[:1], seg[:1])).sum()) * B
                flops = 4 * attended * N * H
                impls = {"pallas": lambda q, k, v, ids=ids: flash_attention(q, k, v, **ids)}
                if cudnn:
                    mask = attention_mask(pos, pos, seg, seg)[:, None] if docs > 1 else None
                    impls["cudnn"] = lambda q, k, v, mask=mask: jax.nn.dot_product_attention(
                        q, k, v, mask=mask, is_causal=mask is None, implementation="cudnn")
                row = {"T": T, "head_dim": H, "heads": f"{N}/{K}", "batch": B, "docs_per_row": docs}
                for name, f in impls.items():
                    row[f"{name}_fwd"] = tflops(flops, timed(jax.jit(f), (q, k, v), reps))
                    row[f"{name}_fwd_bwd"] = tflops(3.5 * flops, timed(fwd_bwd(f), (q, k, v, q), reps))
                if cudnn and all(isinstance(row.get(c), float) for c in ("pallas_fwd_bwd", "cudnn_fwd_bwd")):
                    row["pallas_vs_cudnn_fwd_bwd"] = round(row["pallas_fwd_bwd"] / row["cudnn_fwd_bwd"], 2)
                print(row, flush=True)
                rows.append(row)
    return rows


def train_step_rows(model_overrides, structures, attention_impls, steps, peak):
    """The dense model with every attention impl; structured ones with the first (the FFN is what differs)."""
    rows = []
    for structure, fraction in structures:
        for impl in attention_impls if structure == "dense" else attention_impls[:1]:
            overrides = [*model_overrides, f"model.attention.impl={impl}"]
            if structure != "dense":
                overrides += [f"model.mlp.structure={structure}", f"model.mlp.param_fraction={fraction}"]
            try:
                r = bench(load_config([], overrides), steps=steps)
                row = {"structure": structure, "param_fraction": fraction, "attention": impl, "params": r["params"],
                       "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"]}
                if peak:
                    row["mfu_vs_bf16_peak"] = round(r["mfu"] * r["peak_flops"] * 1e9 / peak, 4)
            except Exception as err:  # noqa: BLE001
                row = {"structure": structure, "param_fraction": fraction, "attention": impl,
                       "tokens_per_s": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}"}
            print(row, flush=True)
            rows.append(row)
    dense = {r["attention"]: r["tokens_per_s"] for r in rows if r["structure"] == "dense"}
    for r in rows:
        base = dense.get(r["attention"])
        if isinstance(base, float) and isinstance(r["tokens_per_s"], float):
            r["speedup"] = round(r["tokens_per_s"] / base, 2)
    return rows


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 reps: checks the script runs (CPU too)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--sections", default="block_diagonal,ffn_layer,attention,train_step",
                    help="comma-separated subset of the sections to run")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    reps = 2 if args.smoke else args.reps
    peak = spec_peak(device.device_kind, "bfloat16")  # datasheet, dense
    t0 = time.time()
    if args.smoke:
        M, D, F, seqs, head_dims, tokens, steps = 64, 64, 256, (128,), (64,), 256, 2
        bd_shapes = [("256^2, 2 blocks", 2, 128, 128), ("256^2, 4 blocks", 4, 64, 64)]
        model = ["model.d_model=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
                 "model.mlp.d_ff=256", "model.vocab_size=256", "model.max_seq_len=128", "data.seq_len=128",
                 f"train.batch_size={jax.device_count()}"]
        structures = [("dense", 1.0), ("blockdense", 0.32)]
    else:
        M, D, F, seqs, head_dims, tokens, steps = 16384, 2048, 8192, (2048, 4096, 8192), (64, 128), 32768, 5
        bd_shapes = [(f"{n}^2, {b} blocks", b, n // b, n // b) for n in (4096, 8192) for b in (2, 4, 8, 16, 32)]
        model = ["model.d_model=2048", "model.num_layers=16", "model.num_heads=16", "model.num_kv_heads=4",
                 "model.mlp.d_ff=8192", "model.vocab_size=32000", "model.max_seq_len=2048", "data.seq_len=2048",
                 "train.batch_size=8", "model.dtype=bfloat16", "model.remat=dots"]
        structures = STRUCTURES
    for structure, fraction in STRUCTURES[3:]:  # the structured FFN's block-diagonal factors at d_model D, d_ff F
        if args.smoke and fraction != 0.32:
            continue
        s = structure_sizes(MlpConfig(d_ff=F, structure=structure, param_fraction=fraction), D, F)
        width = s.rank if structure == "blockdense" else F
        bd_shapes.append((f"{structure} {fraction:.0%} D->{width}", s.blocks, D // s.blocks, width // s.blocks))
    run = {
        "block_diagonal": lambda: block_diagonal_rows(M, bd_shapes, dtype, reps),
        "ffn_layer": lambda: ffn_rows(D, F, M, dtype, reps),
        "attention": lambda: attention_rows(seqs, head_dims, tokens, dtype, reps, cudnn=on_gpu),
        "train_step": lambda: train_step_rows(model, structures, ["cudnn", "pallas"] if on_gpu else ["pallas"], steps,
                                              peak),
    }
    results = {name: section() for name, section in run.items() if name in sections}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python experiments/bench_gpu.py" + (" --smoke" if args.smoke else "")
    if sections != set(run):
        command += f" --sections {args.sections}"
    meta = {"command": command, "commit": commit,
            "date": time.strftime("%Y-%m-%d"), "device": device.device_kind, "platform": device.platform,
            "host": host.node(), "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "reps": reps,
            "bf16_dense_peak_tflops": peak and peak / 1e12, "wall_s": round(time.time() - t0, 1)}
    name = "smoke" if args.smoke else device.device_kind.replace(" ", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_gpu_{name}.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    md = [f"# GPU benchmark on {device.device_kind} ({device.platform})", "",
          f"`{meta['command']}`, commit {commit}, {meta['date']}, jax {jax.__version__}, {meta['dtype']}, median of "
          f"{reps}, {meta['wall_s']} s wall. Forward+backward keeps the forward output live (VJP with a random "
          "cotangent). TFLOP/s count useful FLOPs only."]
    for key, rows in results.items():
        md += ["", f"## {key.replace('_', ' ')}", "", table(rows)]
    (out / f"bench_gpu_{name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / f'bench_gpu_{name}.md'} in {meta['wall_s']} s")
    return {"meta": meta, **results}


if __name__ == "__main__":
    main()
