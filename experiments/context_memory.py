"""Activation memory per device against the sequence axis: a model's loss + gradient step compiled for one row of a
fixed length split over 1, 2, 4 and 8 devices (`mesh.sequence`, 8 fake CPU devices), read from XLA's
`compiled.memory_analysis()` (temporary buffers: activations and their gradients; arguments: params and the row).

    python experiments/context_memory.py            # -> experiments/results/context_memory.{json,md}
    python experiments/context_memory.py --quick    # a small model and row, as the tests run it
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.language_model import build  # noqa: E402
from jaxllm.sharding import logical_to_spec, make_mesh  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(length=8192, model=["model.d_model=256", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=2",
                                 "model.mlp.d_ff=768", "model.vocab_size=1024", "model.max_seq_len=8192"])
QUICK = dict(length=1024, model=["model.max_seq_len=1024"])


def measure(length: int, model: list[str], sequence: int, method: str, remat: str) -> dict:
    """Per-device bytes of the loss + gradient program for one row of `length` tokens over `sequence` devices."""
    cfg = load_config(["tiny"], [*model, f"mesh.sequence={sequence}", "mesh.data=1", f"data.seq_len={length}",
                                 f"model.attention.context_parallel={method}", f"model.remat={remat}"])
    lm = build(cfg)
    mesh = make_mesh(cfg.mesh, jax.devices()[:sequence])
    rows = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), lm.rules, dict(mesh.shape)))
    row = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=rows)
    with jax.set_mesh(mesh):
        shardings = lm.param_shardings(mesh)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), lm.param_shapes, shardings)
        grad = jax.jit(jax.value_and_grad(lambda p, b: lm.loss(p, b)[0]))
        compiled = grad.lower(params, {"inputs": row, "targets": row}).compile()
    m = compiled.memory_analysis()
    return {"sequence": sequence, "method": method, "remat": remat, "length": length,
            "temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes)}


def table(rows: list[dict]) -> list[str]:
    out = ["| mesh.sequence | attention | remat | tokens per device | temporary MiB per device | vs 1 device |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        one = next(x for x in rows if x["sequence"] == 1 and x["remat"] == r["remat"])
        out.append(f"| {r['sequence']} | {r['method'] if r['sequence'] > 1 else 'one device'} | {r['remat']} | "
                   f"{r['length'] // r['sequence']:,} | {r['temp_bytes'] / 2**20:,.1f} | "
                   f"{r['temp_bytes'] / one['temp_bytes']:.2f} |")
    return out


def run(quick: bool) -> list[dict]:
    shape = QUICK if quick else FULL
    rows = []
    for remat in ("dots", "dots_no_batch"):
        rows.append(measure(shape["length"], shape["model"], 1, "ring", remat))
        for sequence in (2, 4, 8):
            for method in ("ring", "allgather"):
                rows.append(measure(shape["length"], shape["model"], sequence, method, remat))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from provenance import provenance, write_artifacts

    rows = run(args.quick)
    meta = provenance("python experiments/context_memory.py" + (" --quick" if args.quick else ""), ("jax", "flax"))
    shape = QUICK if args.quick else FULL
    result = {"meta": meta, "length": shape["length"], "model": shape["model"], "rows": rows}
    md = ["# Activation memory per device against the sequence axis", "",
          f"`{meta['command']}` at commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, {meta['date']}, "
          f"{meta['machine']}; jax {meta['jax']}.", "",
          f"One row of {shape['length']:,} tokens, `tiny` preset with {' '.join(shape['model'])}; the loss + gradient "
          "program compiled for 8 fake CPU devices, `compiled.memory_analysis()` per device. Temporary buffers are the "
          "activations kept for the backward pass and the work space; params are replicated (add `fsdp` to split "
          "them). `dots` keeps every matmul output, attention scores included, outside the context-parallel blocks; "
          "`dots_no_batch` keeps only the weight matmuls' outputs.", "", *table(rows)]
    if not args.quick:
        write_artifacts(RESULTS, "context_memory", result, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
