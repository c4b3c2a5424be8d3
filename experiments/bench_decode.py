"""Decode throughput: jaxllm `generate` (KV cache, one jitted while_loop) vs transformers `generate`
(torch, KV cache) on the same ~56M-param Llama (configs/bench-56m.yaml shape), greedy, same weights.

Each peer runs in its own subprocess, alternating. Reports new tokens per second (all rows) after a
warm-up call, for batch 1 and batch 8. Writes experiments/results/bench_decode.{md,json} (with the command,
commit, date, machine and versions).

    python experiments/bench_decode.py [--rounds 2] [--new-tokens 64] [--prompt 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from provenance import provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_decode.md"
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def make_checkpoint(directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(directory, safe_serialization=True)


def prompts(batch: int, length: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(3, 32000, (batch, length)).tolist()


def run_torch(ckpt: str, batch: int, length: int, new: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    ids = torch.tensor(prompts(batch, length))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=ids, **kw)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, **kw)
        s = time.perf_counter() - t
    return {"seconds": s, "tokens_per_s": batch * new / s, "first": out[0, length:length + 8].tolist()}


def run_jaxllm(ckpt: str, batch: int, length: int, new: int) -> dict:
    from jaxllm.generate import generate
    from jaxllm.interop.hf_checkpoint import load_hf_checkpoint

    lm, params, _ = load_hf_checkpoint(ckpt)
    p = prompts(batch, length)
    generate(lm, params, p, new)
    t = time.perf_counter()
    out = generate(lm, params, p, new)
    s = time.perf_counter() - t
    return {"seconds": s, "tokens_per_s": batch * new / s, "first": out[0][:8]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--peer", choices=["torch", "jaxllm"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        fn = run_torch if args.peer == "torch" else run_jaxllm
        print(json.dumps(fn(args.ckpt, args.batch, args.prompt, args.new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp))
        rows = []
        for batch in (1, 8):
            for r in range(args.rounds):
                for peer in ("torch", "jaxllm") if r % 2 == 0 else ("jaxllm", "torch"):
                    cmd = [sys.executable, __file__, "--peer", peer, "--ckpt", tmp, "--batch", str(batch),
                           "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
                    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                    rows.append((batch, r + 1, peer, res))
                    print(f"batch {batch} round {r + 1} {peer}: {res['tokens_per_s']:.1f} tokens/s", flush=True)
    meta = provenance(f"python experiments/bench_decode.py --rounds {args.rounds} --new-tokens {args.new_tokens} "
                      f"--prompt {args.prompt}", ("jax", "flax", "torch", "transformers"))
    lines = [
        "# Decode throughput: jaxllm vs transformers + torch",
        "",
        f"`{meta['command']}` at commit {meta['commit']}{' + changes' if meta['dirty'] else ''}, {meta['date']}, "
        f"{meta['machine']}; python {meta['python']}, jax {meta['jax']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}.",
        f"Model: random-init Llama, {SHAPE}, f32; greedy, prompt {args.prompt} tokens, {args.new_tokens} new tokens "
        "per row (prefill included in the time), after one warm-up call.",
        "",
        "| batch | round | peer | seconds | new tokens/s | first tokens of row 0 |",
        "|---|---|---|---|---|---|",
    ]
    for batch, r, peer, res in rows:
        lines.append(f"| {batch} | {r} | {peer} | {res['seconds']:.2f} | {res['tokens_per_s']:.1f} | {res['first']} |")
    lines.append("")
    medians = {}
    for batch in (1, 8):
        med = {p: statistics.median(res["tokens_per_s"] for b, _, q, res in rows if b == batch and q == p)
               for p in ("torch", "jaxllm")}
        medians[batch] = med
        lines.append(f"Batch {batch}: median jaxllm {med['jaxllm']:.1f} vs torch {med['torch']:.1f} new tokens/s "
                     f"(**{med['jaxllm'] / med['torch']:.2f}x**).")
    same = all(res["first"] == other["first"] for b, r, _, res in rows for b2, r2, _, other in rows if (b, r) == (b2, r2))
    RESULTS.with_suffix(".json").write_text(json.dumps({
        "meta": meta, "runs": [{"batch": b, "round": r, "peer": q, **res} for b, r, q, res in rows],
        "median_tokens_per_s": {str(b): m for b, m in medians.items()}, "same_tokens": same}, indent=1) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
