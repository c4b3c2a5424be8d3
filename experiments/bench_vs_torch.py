"""Train-step throughput: jaxllm vs Hugging Face transformers + torch (eager, sdpa), same run, same shape.

Shape (configs/bench-56m.yaml): vocab 32000, d_model 512, d_ff 1408, 8 layers, 8 heads, 4 kv heads,
seq 512, batch 8, f32, AdamW. Each peer runs in its own subprocess, alternating, `--rounds` times;
the table reports each run and the ratio of medians. Writes experiments/results/bench_vs_torch.{md,json}
(with the command, commit, date, machine and versions).

    python experiments/bench_vs_torch.py [--rounds 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from provenance import provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_vs_torch.md"


def torch_peer(steps: int, warmup: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, 32000, (8, 513))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32000), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return {"step_s": round(s, 4), "tokens_per_s": round(8 * 512 / s, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def run(peer: str, steps: int) -> dict:
    if peer == "torch":
        cmd = [sys.executable, __file__, "--peer", "torch", "--steps", str(steps)]
    else:
        cmd = [sys.executable, "-m", "jaxllm.cli", "bench", "--config", "bench-56m", "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peer", choices=["torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer == "torch":
        print(json.dumps(torch_peer(args.steps, warmup=1)))
        return
    rows = []
    for r in range(args.rounds):
        for peer in ("torch", "jaxllm") if r % 2 == 0 else ("jaxllm", "torch"):
            res = run(peer, args.steps)
            rows.append((r + 1, peer, res))
            print(f"round {r + 1} {peer}: {res['tokens_per_s']} tokens/s", flush=True)
    med = {p: statistics.median(res["tokens_per_s"] for _, q, res in rows if q == p) for p in ("torch", "jaxllm")}
    jax_runs = [res for _, q, res in rows if q == "jaxllm"]
    meta = provenance(f"python experiments/bench_vs_torch.py --rounds {args.rounds} --steps {args.steps}",
                      ("jax", "flax", "torch", "transformers"))
    lines = [
        "# Train-step throughput: jaxllm vs transformers + torch",
        "",
        f"`{meta['command']}` at commit {meta['commit']}{' + changes' if meta['dirty'] else ''}, {meta['date']}, "
        f"{meta['machine']}; python {meta['python']}, jax {meta['jax']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}.",
        "Shape: Llama, vocab 32000, d_model 512, d_ff 1408, 8 layers, 8 heads / 4 kv heads, seq 512, batch 8, "
        "f32, AdamW (+ clipping). Median of timed steps after one warm-up step.",
        "",
        "| round | peer | step (s) | tokens/s | MFU |",
        "|---|---|---|---|---|",
    ]
    for r, peer, res in rows:
        lines.append(f"| {r} | {peer} | {res['step_s']} | {res['tokens_per_s']} | {res.get('mfu', '')} |")
    lines += ["", f"Median tokens/s: jaxllm {med['jaxllm']:.0f}, torch {med['torch']:.0f}; "
                  f"ratio **{med['jaxllm'] / med['torch']:.2f}x**."]
    RESULTS.with_suffix(".json").write_text(json.dumps({
        "meta": meta, "rounds": [{"round": r, "peer": q, **res} for r, q, res in rows],
        "median_tokens_per_s": med, "speedup": med["jaxllm"] / med["torch"],
        "jaxllm_mfu": statistics.median(res["mfu"] for res in jax_runs),
        "peak_gflops": jax_runs[0]["peak_flops"], "peak_source": jax_runs[0]["peak_source"]}, indent=1) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
