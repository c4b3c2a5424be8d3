"""FFN-SkipLLM while decoding: skipped share, agreement with full decoding and batch-1 tokens/s per threshold, on a
model pretrained here on the stdlib corpus (by default 8 layers of width 512 with d_ff 2048, so that the FFNs hold
most of the weights a decode step reads, as in the paper's models; the first and last layer run every FFN).

For each threshold: greedy continuations of held-out stdlib snippets, one at a time (batch 1, where a skip is a real
`lax.cond`), timed after a warm-up call; quality = the share of new tokens equal to full decoding's. Writes
experiments/results/bench_ffn_skip.{md,json} (with the command, commit, date, machine and versions).

    python experiments/bench_ffn_skip.py [--base-steps 300] [--d-model 512] [--layers 8] [--d-ff 2048] [--seq-len 256]
        [--prompts 8] [--new-tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from provenance import provenance, write_artifacts  # noqa: E402
from real_text import corpus_overrides  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.data.pipeline import load_corpus  # noqa: E402
from jaxllm.generate import FfnSkipping, generate  # noqa: E402
from jaxllm.interop.models import load_model  # noqa: E402
from jaxllm.train.trainer import train  # noqa: E402

THRESHOLDS = (2.0, 0.999, 0.995, 0.99, 0.98, 0.95)  # 2.0: never skip (the reference)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256, help="pretraining sequence length (and the model's positions)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    shape = [f"model.d_model={args.d_model}", f"model.num_layers={args.layers}",
             f"model.num_heads={args.d_model // 64}", "model.num_kv_heads=2", f"model.mlp.d_ff={args.d_ff}"]
    base = Path(tempfile.mkdtemp(prefix="ffn-skip-")) / "base"
    result = train(load_config(["small"], [*corpus_overrides(), *shape, f"data.seq_len={args.seq_len}",
                                           "train.batch_size=4", f"train.steps={args.base_steps}", "train.eval_every=0",
                                           f"train.warmup_steps={max(1, args.base_steps // 10)}",
                                           f"checkpoint.save_every={args.base_steps}", f"checkpoint.run_dir={base}"]))
    if result.interrupted:
        raise SystemExit("the base's pretraining was interrupted")
    m = load_model(base)
    corpus = load_corpus(m.config.data)
    prompts = [m.tokenizer.encode(doc[:400], add_special_tokens=True)[:64] for doc in corpus.eval_docs[: args.prompts]]
    for threshold in THRESHOLDS:  # compile every threshold's steps for every prompt length first
        for p in prompts:
            generate(m.lm, m.params, [p], args.new_tokens, ffn_skip=FfnSkipping(threshold))
    speeds: dict[float, list[float]] = {t: [] for t in THRESHOLDS}
    outputs, skips = {}, {}
    for _ in range(args.rounds):  # thresholds alternate within each round: the machine's drift hits all alike
        for threshold in THRESHOLDS:
            skip = FfnSkipping(threshold, warmup=4, protect=1)
            start = time.perf_counter()
            outs = [generate(m.lm, m.params, [p], args.new_tokens, ffn_skip=skip)[0] for p in prompts]
            speeds[threshold].append(sum(len(o) for o in outs) / (time.perf_counter() - start))
            outputs[threshold], skips[threshold] = outs, skip.skipped_fraction
    reference = outputs[THRESHOLDS[0]]
    rows = []
    for threshold in THRESHOLDS:
        same = [np.mean([a == b for a, b in zip(o, r)]) if r else 1.0 for o, r in zip(outputs[threshold], reference)]
        rows.append({"threshold": threshold, "skipped": skips[threshold], "agreement": float(np.mean(same)),
                     "tokens_per_s": float(np.median(speeds[threshold])), "rounds": speeds[threshold]})
        print(rows[-1], flush=True)
    full = rows[0]["tokens_per_s"]
    command = "python experiments/bench_ffn_skip.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = provenance(command.strip())
    table = [f"| {'never' if r['threshold'] > 1 else r['threshold']} | {100 * r['skipped']:.1f}% | "
             f"{100 * r['agreement']:.1f}% | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / full:.2f}x |" for r in rows]
    write_artifacts(Path(args.out), "bench_ffn_skip", {"meta": meta, "shape": shape, "base_steps": args.base_steps,
                                                      "rows": rows}, [
        "# FFN-SkipLLM while decoding (batch 1)", "",
        f"`{meta['command']}` at commit {meta['commit']}{' + changes' if meta['dirty'] else ''}, {meta['date']}, "
        f"{meta['machine']}; jax {meta['jax']}.", "",
        f"Model: {', '.join(a.replace('model.', '') for a in shape)}, {args.base_steps} steps of 4 x {args.seq_len} "
        "tokens on the stdlib corpus; "
        f"{args.prompts} held-out prompts of up to 64 tokens, {args.new_tokens} greedy new tokens each; the first 4 "
        f"new tokens and layers 0 and {args.layers - 1} never skip.", "",
        f"Tokens/s: the median of {args.rounds} rounds, thresholds alternating within each.", "",
        "| threshold (cosine) | FFNs skipped | tokens equal to full decoding | tokens/s | vs full |",
        "|---:|---:|---:|---:|---:|", *table, ""])


if __name__ == "__main__":
    main()
