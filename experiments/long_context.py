"""Extend a trained model's context with YaRN and continued pretraining on longer packed rows, each row split over a
`sequence` mesh axis (context parallelism on 8 fake CPU devices: `mesh/cp`, ring attention, zigzag layout).

1. a base model trains on Python's own source (`data.source=stdlib`) at `--short` tokens per row;
2. read at `--long` tokens per row it extrapolates RoPE past what it saw: held-out loss by position range;
3. `finetune.method=full` from that base with `model.rope_scaling.type=yarn` (factor long / short) at `--long`
   tokens per row, then the same held-out loss.

    python experiments/long_context.py           # -> experiments/results/long_context.{json,md}
    python experiments/long_context.py --quick   # a few steps, as the tests run it
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.data.pipeline import load_corpus, make_batches  # noqa: E402
from jaxllm.language_model import LanguageModel, Params  # noqa: E402
from jaxllm.interop.models import load_model  # noqa: E402
from jaxllm.train.trainer import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = ["model.d_model=128", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp.d_ff=384"]
RANGES = 4  # held-out loss reported over this many equal position ranges of a long row


def loss_by_position(lm: LanguageModel, params: Params, rows: list[dict], parts: int) -> list[float]:
    """Mean held-out token loss over `parts` equal position ranges of the rows (no packing across the ranges)."""
    def per_token(p, batch):
        logits = lm.apply(p, batch["inputs"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
        return -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0], batch["loss_mask"]

    step = jax.jit(per_token)
    sums, counts = np.zeros(parts), np.zeros(parts)
    for batch in rows:
        nll, mask = (np.asarray(x) for x in step(params, batch))
        T = nll.shape[1]
        for i in range(parts):
            sl = slice(i * T // parts, (i + 1) * T // parts)
            sums[i] += (nll[:, sl] * mask[:, sl]).sum()
            counts[i] += mask[:, sl].sum()
    return (sums / np.maximum(counts, 1)).tolist()


def held_out_rows(cfg, long: int, batches: int) -> list[dict]:
    corpus = load_corpus(cfg.data)
    docs = [d for d in corpus.eval_docs if len(d) > 4 * long] or corpus.eval_docs  # long documents: a row is one
    it = iter(make_batches(docs, corpus.tokenizer, seq_len=long, batch_size=8, seed=0, repeat=False))
    return [next(it) for _ in range(batches)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=128)
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--extend-steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="8 + 4 steps, 64 -> 128 tokens: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.short, args.long, args.base_steps, args.extend_steps = 64, 128, 8, 4
    factor = args.long / args.short
    with tempfile.TemporaryDirectory() as tmp:
        base_run, long_run = Path(tmp) / "base", Path(tmp) / "long"
        common = ["data.source=stdlib", "train.eval_every=0", "train.eval_batches=4", "train.log_every=50", "checkpoint.async_save=false",
                  "train.batch_size=8", "train.learning_rate=3e-3"]
        base_cfg = load_config(["tiny"], [*MODEL, *common, f"data.seq_len={args.short}", f"model.max_seq_len={args.short}",
                                          f"train.steps={args.base_steps}", f"checkpoint.run_dir={base_run}"])
        train(base_cfg)
        long_cfg = load_config(["tiny", "mesh/cp"], [
            *MODEL, *common, f"finetune.base={base_run}", "finetune.method=full", "data.format=text",
            f"data.seq_len={args.long}", f"model.max_seq_len={args.long}", "model.rope_scaling.type=yarn",
            f"model.rope_scaling.factor={factor}", f"model.rope_scaling.original_max_seq_len={args.short}",
            f"train.steps={args.extend_steps}", "train.learning_rate=1e-3",
            f"train.warmup_steps={min(10, args.extend_steps)}",
            f"checkpoint.run_dir={long_run}"])
        train(long_cfg)
        rows = held_out_rows(long_cfg, args.long, 2 if args.quick else 8)
        base = load_model(base_run)
        extrapolating = LanguageModel(load_config([base_run / "config.yaml"], [f"model.max_seq_len={args.long}"]).model)
        extended = load_model(long_run)
        results = {"base, no scaling": loss_by_position(extrapolating, base.params, rows, RANGES),
                   "YaRN, no training": loss_by_position(extended.lm, base.params, rows, RANGES),
                   f"YaRN + {args.extend_steps} steps at {args.long}": loss_by_position(extended.lm, extended.params,
                                                                                     rows, RANGES)}
    from provenance import provenance, write_artifacts

    cmd = "python experiments/long_context.py" + (" --quick" if args.quick else "")
    meta = provenance(cmd, ("jax", "flax"))
    edges = [f"{i * args.long // RANGES}-{(i + 1) * args.long // RANGES - 1}" for i in range(RANGES)]
    md = ["# Context extension: YaRN + continued pretraining under context parallelism", "",
          f"`{meta['command']}` at commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, {meta['date']}, "
          f"{meta['machine']}; jax {meta['jax']}.", "",
          f"A {' '.join(MODEL)} model trained {args.base_steps} steps on Python's source at {args.short} tokens per row, "
          f"then extended to {args.long} (YaRN factor {factor:g}) with {args.extend_steps} steps of full fine-tuning, "
          "each row split over `mesh.sequence=4` (ring attention, zigzag layout). Held-out loss (nats/token) on rows of "
          f"{args.long} tokens, by position range:", "",
          "| model | " + " | ".join(f"positions {e}" for e in edges) + " |", "|---|" + "---|" * RANGES]
    md += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in losses) + " |" for name, losses in results.items()]
    result = {"meta": meta, "short": args.short, "long": args.long, "base_steps": args.base_steps,
              "extend_steps": args.extend_steps, "ranges": edges, "loss_by_range": results}
    if not args.quick:
        write_artifacts(RESULTS, "long_context", result, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
