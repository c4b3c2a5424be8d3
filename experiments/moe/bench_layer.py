"""MoE FFN layer vs a dense FFN of equal active parameters: tokens/s forward and forward+backward.

The dense FFN has d_ff = top_k x the expert width, so both spend the same matmul FLOPs per token; the MoE
layer adds the router, the sort/gather of assignments and (capacity path) the dispatch einsums, and holds
experts/top_k times the parameters. Jitted, f32, median of --reps timed calls after a warm-up.

    python experiments/moe/bench_layer.py [--d-model 512 --expert-ff 1024 --experts 8 --top-k 2 --tokens 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance  # noqa: E402

from jaxllm.config import MlpConfig, ModelConfig, MoeConfig
from jaxllm.models.mlp import Mlp
from jaxllm.train.bench import median_seconds
from jaxllm.models.moe import _DEFAULT_RULES
from jaxllm.models.moe import MoeFfn


def timings(layer: nnx.Module, x, reps: int) -> tuple[float, float]:
    graph, params = nnx.split(layer)

    def out(p, x):
        y = nnx.merge(graph, p)(x)
        return (y[0] if isinstance(y, tuple) else y).astype(jnp.float32)

    fwd = jax.jit(out)
    both = jax.jit(jax.grad(lambda p, x: jnp.sum(out(p, x) ** 2), argnums=(0, 1)))
    return median_seconds(fwd, params, x, reps=reps), median_seconds(both, params, x, reps=reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--expert-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="float32", help="compute dtype (params stay f32)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "bench_layer.md"))
    args = ap.parse_args()
    D, F, E, K, N = args.d_model, args.expert_ff, args.experts, args.top_k, args.tokens
    base = ModelConfig(vocab_size=256, d_model=D, num_layers=1, num_heads=8, mlp=MlpConfig(d_ff=K * F), dtype=args.dtype)
    x = jax.random.normal(jax.random.key(0), (1, N, D))
    layers = {f"dense FFN, d_ff {K * F}": Mlp(base, _DEFAULT_RULES, rngs=nnx.Rngs(0))}
    grouped = ["tiled", "xla"] if jax.devices()[0].platform == "cpu" else ["pallas", "tiled", "xla"]
    names = {"pallas": "Pallas gmm", "tiled": "tiled gmm", "xla": "lax.ragged_dot"}
    for dispatch, impl in [("dropless", g) for g in grouped] + [("capacity", "auto")]:
        cfg = dataclasses.replace(base, moe=MoeConfig(num_experts=E, top_k=K, d_ff=F, dispatch=dispatch, impl=impl))
        how = names[impl] if dispatch == "dropless" else "capacity factor 1.25"
        layers[f"MoE {E} x {F}, top-{K}, {dispatch}, {how}"] = MoeFfn(cfg, rngs=nnx.Rngs(0))
    device = jax.devices()[0]
    meta = provenance(f"python experiments/moe/bench_layer.py --d-model {D} --expert-ff {F} --experts {E} --top-k {K} "
                      f"--tokens {N} --dtype {args.dtype} --reps {args.reps}")
    lines = [f"# MoE layer vs dense FFN of equal active parameters ({device.device_kind}, {device.platform})", "",
             f"`{meta['command']}` at commit {meta['commit']}{' + changes' if meta['dirty'] else ''}, {meta['date']}, "
             f"{meta['machine']}; jax {meta['jax']}; median of {args.reps}; {jax.device_count()} device(s).", "",
             "| layer | params | fwd tokens/s | fwd+bwd tokens/s | fwd vs dense | fwd+bwd vs dense |", "|---|---:|---:|---:|---:|---:|"]
    ref, rows = None, {}
    for name, layer in layers.items():
        params = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
        try:
            t_f, t_b = timings(layer, x, args.reps)
        except Exception as err:  # noqa: BLE001 - e.g. a kernel that does not fit this device
            lines.append(f"| {name} | {params:,} | failed: {type(err).__name__}: {str(err).splitlines()[0][:80]} | | | |")
            print(lines[-1], flush=True)
            continue
        ref = ref or (t_f, t_b)
        rows[name] = {"params": params, "forward_s": t_f, "forward_backward_s": t_b,
                      "forward_vs_dense": ref[0] / t_f, "forward_backward_vs_dense": ref[1] / t_b}
        lines.append(f"| {name} | {params:,} | {N / t_f:,.0f} | {N / t_b:,.0f} | {ref[0] / t_f:.2f}x | {ref[1] / t_b:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "tokens": N, "layers": rows}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
