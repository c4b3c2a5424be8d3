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
    return (f"it took **{run['wall_s'] / 60:.1f} min wall** ({run['wall_s']:.0f} s; {passed.group(1)} tests passed, "
            f"peak memory {run['peak_rss_gib']} GiB across workers and subprocesses; {_made(r['meta'])})")


def default_run() -> str:
    r = _load("default_run")
    run = r["run"]
    gap = run["eval_loss"] - run["floor"]
    return (f"{run['steps']} steps in {run['wall_s']:.0f} s wall clock ({run['tokens_per_s']:,.0f} tokens/s at the "
            f"end), train loss {run['first_loss']:.2f} -> {run['last_loss']:.3f}, **eval loss {run['eval_loss']:.3f} "
            f"against a floor of {run['floor']:.3f}** nats/token (the exact entropy of the held-out documents): "
            f"{gap:.3f} nats ({100 * gap / run['floor']:.1f}%) above a perfect model ({_made(r['meta'])})")


def bench_finetune() -> str:
    r = _load("bench_finetune")
    tps, mem, mfu = r["median_tokens_per_s"], r["median_peak_rss_gib"], r["mfu"]
    return (f"jaxllm {tps['jaxllm']:.0f} vs {tps['torch']:.0f} tokens/s (**{r['speedup']:.2f}x**), peak memory "
            f"{mem['jaxllm']:.2f} vs {mem['torch']:.2f} GiB, MFU {100 * mfu['jaxllm']:.0f}% vs "
            f"{100 * mfu['torch']:.0f}% ({_made(r['meta'])})")


REPORTS = {"suite_time": suite_time, "default_run": default_run, "bench_finetune": bench_finetune}


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
