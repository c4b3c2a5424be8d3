"""When does decoding with the merged dense FFN map beat the factored structured one? Times one FFN map's
forward (jitted, f32) on N tokens both ways, N = tokens in flight, and writes where merged stops
winning: the measured basis of `model.mlp.merge_below_tokens`.

    python experiments/structured_ffn/bench_premerge.py [--d-model 1024 --d-ff 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from provenance import provenance  # noqa: E402

from jaxllm.config import MlpConfig, ModelConfig  # noqa: E402
from jaxllm.models.structured import StructuredLinear  # noqa: E402
from jaxllm.train.bench import median_seconds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).parent / "premerge.md"))
    args = ap.parse_args()
    D, F = args.d_model, args.d_ff
    tokens = (1, 4, 16, 64, 256, 1024)
    m = provenance(f"python experiments/structured_ffn/bench_premerge.py --d-model {D} --d-ff {F}")
    lines = [f"# Merged vs factored FFN map [{D} -> {F}] forward, by tokens in flight", "",
             f"`{m['command']}` at commit {m['commit']}{' + changes' if m['dirty'] else ''}, {m['date']}, "
             f"{m['machine']} ({jax.devices()[0].platform}); jax {m['jax']}; median of 30 jitted calls, f32. Cells: factored / merged time (ratio > 1: merged faster).", "",
             "| structure | " + " | ".join(f"N={n}" for n in tokens) + " | merged faster up to N |",
             "|---|" + "---:|" * (len(tokens) + 1)]
    for structure, fraction in (("lowrank", 0.32), ("blockdense", 0.32), ("blockshuffle", 0.32), ("lowrank", 0.63)):
        cfg = ModelConfig(d_model=D, mlp=MlpConfig(d_ff=F, structure=structure, param_fraction=fraction))
        layer = StructuredLinear(cfg, D, F, ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(0))
        w = layer.dense_kernel()
        factored, merged = jax.jit(lambda x: layer(x)), jax.jit(lambda x: x @ w)
        cells, best, streak = [], 0, True
        for n in tokens:
            x = jax.random.normal(jax.random.key(0), (n, D))
            tf, tm = median_seconds(factored, x, reps=30), median_seconds(merged, x, reps=30)
            cells.append(f"{1e3 * tf:.2f} / {1e3 * tm:.2f} ms ({tf / tm:.2f})")
            streak = streak and tm < tf  # merged faster for every N so far
            best = n if streak else best
        lines.append(f"| {structure} {fraction:.0%} | " + " | ".join(cells) + f" | {best} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
