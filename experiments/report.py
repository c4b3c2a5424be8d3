"""The README's measured sentences, written from the artifacts under experiments/results/.

A sentence the README states as a measurement sits between `<!-- report:NAME -->` and `<!-- /report -->`;
this script renders it from NAME's artifact (JSON written by the script that measured it). The tests fail when
the README and the artifacts disagree, so a number is never retyped, only regenerated.

    python experiments/report.py           # rewrite the README's report blocks from the artifacts
    python experiments/report.py --check   # exit 1 (and show the blocks) if the README differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BLOCK = re.compile(r"<!-- report:(\w+) -->(.*?)<!-- /report -->", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _made(meta: dict) -> str:
    return f"{meta['machine']}, {meta['date'][:10]}, commit {meta['commit']}{' + changes' if meta['dirty'] else ''}"


def suite_time() -> str:
    r = _load("test_suite_time")
    run, passed = r["run"], re.search(r"(\d+) passed", r["run"]["summary"])
    slow = re.search(r"(\d+) deselected", run["summary"])
    left = f", {slow.group(1)} slow ones left for `pytest -m slow`" if slow else ""
    return (f"it took **{run['wall_s'] / 60:.1f} min wall** ({run['wall_s']:.0f} s; {passed.group(1)} tests passed{left}, "
            f"peak memory {run['peak_rss_gib']} GiB across workers and subprocesses; {_made(r['meta'])})")


def default_run() -> str:
    r = _load("default_run")
    run = r["run"]
    gap = run["eval_loss"] - run["floor"]
    return (f"{run['steps']} steps in {run['wall_s']:.0f} s wall clock ({run['tokens_per_s']:,.0f} tokens/s at the "
            f"end), train loss {run['first_loss']:.2f} -> {run['last_loss']:.3f}, **eval loss {run['eval_loss']:.3f} "
            f"against a floor of {run['floor']:.3f}** nats/token (the exact entropy of the held-out documents): "
            f"{gap:.3f} nats ({100 * gap / run['floor']:.1f}%) above a perfect model ({_made(r['meta'])})")


def bench_vs_torch() -> str:
    r = _load("bench_vs_torch")
    tps = r["median_tokens_per_s"]
    return (f"jaxllm {tps['jaxllm']:,.0f} vs torch {tps['torch']:,.0f} tokens/s, **{r['speedup']:.2f}x** (median of "
            f"{len(r['rounds']) // 2} alternating runs each; jaxllm MFU {100 * r['jaxllm_mfu']:.0f}%; {_made(r['meta'])})")


def bench_decode() -> str:
    r = _load("bench_decode")
    med = r["median_tokens_per_s"]
    per_batch = "; ".join(f"batch {b}: {m['jaxllm']:.0f} vs {m['torch']:.0f} new tokens/s (**{m['jaxllm'] / m['torch']:.2f}x**)"
                          for b, m in med.items())
    same = "the same greedy tokens" if r["same_tokens"] else "different greedy tokens (see the artifact)"
    return f"jaxllm vs torch, {per_batch}; {same} ({_made(r['meta'])})"


def bench_finetune() -> str:
    r = _load("bench_finetune")
    tps, mem, mfu = r["median_tokens_per_s"], r["median_peak_rss_gib"], r["mfu"]
    return (f"jaxllm {tps['jaxllm']:.0f} vs {tps['torch']:.0f} tokens/s (**{r['speedup']:.2f}x**; "
            f"{r['speedup_same_malloc']:.2f}x against torch with huge-page malloc too), peak memory "
            f"{mem['jaxllm']:.2f} vs {mem['torch']:.2f} GiB, MFU {100 * mfu['jaxllm']:.0f}% vs "
            f"{100 * mfu['torch']:.0f}% ({_made(r['meta'])})")


def bench_ffn_skip() -> str:
    r = _load("bench_ffn_skip")
    rows = [row for row in r["rows"] if row["threshold"] <= 1]
    full = r["rows"][0]["tokens_per_s"]
    span = lambda xs, f: f"{f(min(xs))}-{f(max(xs))}"
    pct = lambda x: f"{100 * x:.1f}%"
    return (f"at batch 1 ({', '.join(a.replace('model.', '') for a in r['shape'])}; cosine thresholds "
            f"{min(x['threshold'] for x in rows)}-{max(x['threshold'] for x in rows)}) "
            f"{span([x['skipped'] for x in rows], pct)} of the FFNs are skipped, "
            f"{span([x['agreement'] for x in rows], pct)} of the new tokens equal full decoding's, and decoding runs "
            f"at **{span([x['tokens_per_s'] / full for x in rows], lambda v: f'{v:.2f}')}x** full decoding's "
            f"tokens/s ({_made(r['meta'])})")


def conditional_compute() -> str:
    r = json.loads((ROOT / "experiments" / "moe" / "conditional_compute.json").read_text())
    st = r["settings"]
    return "\n".join([f"\n{st['seeds']} seeds, {st['base_steps']} base steps then {st['steps']} further steps per "
                      f"variant ({_made(r)}; runs at commits "
                      f"{_run_commits(r['runs'])}):", "",
                      *r["claims"], ""])


def moe_bench_layer() -> str:
    r = json.loads((ROOT / "experiments" / "moe" / "bench_layer.json").read_text())
    layers = r["layers"]
    pick = lambda key: next(v for k, v in layers.items() if key in k)
    dropless, capacity = pick("dropless, tiled gmm"), pick("capacity")
    return (f"on this CPU ({r['tokens']:,} tokens, f32) the dropless layer runs at {dropless['forward_vs_dense']:.2f}x / "
            f"{dropless['forward_backward_vs_dense']:.2f}x the dense layer's tokens/s forward / forward+backward, "
            f"capacity dispatch at {capacity['forward_vs_dense']:.2f}x / {capacity['forward_backward_vs_dense']:.2f}x "
            f"({_made(r['meta'])})")


def _experiment(name: str) -> dict:
    return json.loads((ROOT / "experiments" / name / "results.json").read_text())


def _run_commits(runs: dict) -> str:
    """The commits an experiment's runs ran at (each run records its own)."""
    return ", ".join(sorted({str(run.get("commit")) for run in runs.values()}))


def _mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
    return f"{m:.3f} ± {s:.3f}"


def structured_ffn() -> str:
    r = _experiment("structured_ffn")
    st, table = r["settings"], r["table"]
    head = " | ".join(f"d_model {d}, {n} layers" for d, n, _ in st["sizes"])
    rows = [f"| {name} | " + " | ".join(f"{_mean_std(ls)} ({p / 1e6:.2f}M)" for ls, p in zip(t["losses"], t["params"]))
            + " |" for name, t in table.items()]
    return "\n".join([
        f"\n{st['seeds']} seeds, {st['steps']} steps of 8 x 256 tokens per run ({_made(r)}); eval loss (nats per BPE "
        "token) mean ± std and params:", "", f"| run | {head} |", "|---|" + "---:|" * len(st["sizes"]), *rows, "",
        *r["claims"], ""])


def lora_experiment() -> str:
    r = _experiment("lora")
    st, runs = r["settings"], r["runs"]
    by = lambda n, k: [runs[f"{n}|{s}"][k] for s in range(st["seeds"])]
    rows = [f"| {n} | {runs[f'{n}|0']['trainable']:,} | {_mean_std(by(n, 'held_out_loss'))} | "
            f"{_mean_std([100 * a for a in by(n, 'held_out_accuracy')])}% | {_mean_std(by(n, 'pretrain_eval_loss'))} |"
            for n in r["methods"]]
    b = r["base"]
    return "\n".join([
        f"\n{st['seeds']} seeds, {st['steps']} steps of 8 x {st['seq_len']} tokens per method ({_made(r)}; runs at "
        f"commits {_run_commits(runs)}); the base "
        f"scores {b['held_out_loss']:.3f} on the held-out task and {b['pretrain_eval_loss']:.3f} on its own eval files:",
        "", "| method | trainable params | held-out loss | held-out token accuracy | pretraining-eval loss after |",
        "|---|---:|---:|---:|---:|", *rows, "", *r["claims"], ""])


def moe_experiment() -> str:
    r = _experiment("moe")
    st, runs = r["settings"], r["runs"]
    by = lambda n, k: [runs[f"{n}|{s}"][k] for s in range(st["seeds"])]
    dense_flops = runs["dense|0"]["flops"]
    rows = [f"| {n} | {runs[f'{n}|0']['params']:,} | {sum(by(n, 'experts_per_token')) / st['seeds']:.2f} | "
            f"{sum(by(n, 'flops')) / st['seeds'] / dense_flops:.2f}x | {_mean_std(by(n, 'eval_loss'))} |" for n in st["runs"]]
    return "\n".join([
        f"\n{st['seeds']} seeds, {st['steps']} steps of 8 x 256 tokens per run ({_made(r)}):", "",
        "| run | params | real experts / token | training FLOPs vs dense | eval loss |", "|---|---:|---:|---:|---:|",
        *rows, "", *r["claims"], ""])


def compress_experiment() -> str:
    r = _experiment("compress")
    st = r["settings"]
    return "\n".join([
        f"\nA base of {', '.join(a.replace('model.', '') for a in st['shape'])} after {st['base_steps']} steps on the stdlib corpus (eval loss "
        f"{r['base']['eval_loss']:.3f}), {st['calib']} calibration rows of {st['seq_len']} tokens, MaskLLM "
        f"{st['maskllm_steps']} steps x {st['seeds']} seeds ({_made(r)}; runs at commits "
        f"{_run_commits(r['runs'])}); eval loss on the held-out files:",
        "", *[line.replace("## ", "**", 1) + "**" if line.startswith("## ") else line for line in r["tables"]],
        "", *r["claims"], ""])


def context_memory() -> str:
    r = _load("context_memory")
    rows = [x for x in r["rows"] if x["remat"] == "dots_no_batch"]
    two = next(x for x in rows if x["sequence"] == 2 and x["method"] == "ring")
    table = [f"| {x['sequence']} | {x['method'] if x['sequence'] > 1 else 'one device (XLA attention)'} | "
             f"{r['length'] // x['sequence']:,} | {x['temp_bytes'] / 2**20:,.0f} | "
             f"{x['temp_bytes'] / two['temp_bytes']:.2f} |" for x in rows]
    return "\n".join([
        f"\nOne row of {r['length']:,} tokens, `model.remat=dots_no_batch`, the loss + gradient program's temporary "
        f"buffers per device (XLA's `memory_analysis`; {_made(r['meta'])}). One device runs the XLA attention path, "
        "whose [T, T] scores dominate at this length:", "",
        "| mesh.sequence | attention | tokens per device | activation MiB per device | vs ring on 2 |",
        "|---:|---|---:|---:|---:|", *table, ""])


def long_context() -> str:
    r = _load("long_context")
    names = list(r["loss_by_range"])
    first, last = r["loss_by_range"][names[0]], r["loss_by_range"][names[-1]]
    return (f"trained at {r['short']} tokens per row and read at {r['long']}, held-out loss over positions "
            f"{r['ranges'][-1]} is {first[-1]:.3f} nats/token without scaling and **{last[-1]:.3f}** after YaRN and "
            f"{r['extend_steps']} steps at {r['long']} tokens under `mesh/cp` ({_made(r['meta'])})")


REPORTS = {"suite_time": suite_time, "default_run": default_run, "bench_vs_torch": bench_vs_torch,
           "bench_decode": bench_decode, "bench_finetune": bench_finetune, "context_memory": context_memory,
           "long_context": long_context,
           "moe_bench_layer": moe_bench_layer, "bench_ffn_skip": bench_ffn_skip,
           "conditional_compute": conditional_compute,
           "structured_ffn": structured_ffn, "lora_experiment": lora_experiment, "moe_experiment": moe_experiment,
           "compress_experiment": compress_experiment}


def update(text: str) -> str:
    """`text` with every report block rendered from its artifact (KeyError for an unknown report name)."""
    return BLOCK.sub(lambda m: f"<!-- report:{m.group(1)} -->{REPORTS[m.group(1)]()}<!-- /report -->", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the README differs")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = update(text)
    if args.check:
        stale = [m.group(0) for m in BLOCK.finditer(text) if m.group(0) not in new]
        print("\n\n".join(stale) or "README agrees with the artifacts")
        return 1 if stale else 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
