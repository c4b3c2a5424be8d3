"""The README's default run, measured: `jaxllm train` with no arguments (the small preset on the built-in
corpus), in its own process as a user runs it. Records wall time, the last logged tokens/s, the first and last
train loss, the final eval loss and the corpus's exact entropy floor, with the command, commit, date, machine
and versions. Writes experiments/results/default_run.{md,json}.

    python experiments/default_run.py              # the full default run (300 steps)
    python experiments/default_run.py --steps 20   # shortened (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, provenance


def run(steps: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"checkpoint.run_dir={tmp}/run"] + ([f"train.steps={steps}"] if steps else [])
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "jaxllm.cli", "train", *overrides], cwd=ROOT,
                              capture_output=True, text=True, timeout=3600)
        wall = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        logs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logs if "train/loss" in m]
    evals = [m for m in logs if "eval/loss" in m]
    floor = re.search(r"floor ([0-9.]+)", done.stdout)
    return {"wall_s": round(wall, 1), "steps": train[-1]["step"], "first_loss": train[0]["train/loss"],
            "last_loss": train[-1]["train/loss"], "tokens_per_s": train[-1]["train/tokens_per_second"],
            "eval_loss": evals[-1]["eval/loss"], "floor": float(floor.group(1)) if floor else None}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_run.json").write_text(json.dumps(result, indent=2) + "\n")
    m, r = result["meta"], result["run"]
    gap = r["eval_loss"] - r["floor"]
    (out / "default_run.md").write_text(
        f"# The default run\n\n`{m['command']}` at commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, "
        f"{m['date']}, {m['machine']}; python {m['python']}, jax {m['jax']}, flax {m['flax']}.\n\n"
        f"{r['steps']} steps in {r['wall_s']:.0f} s wall clock (process start to exit), {r['tokens_per_s']:,.0f} "
        f"tokens/s at the last log; train loss {r['first_loss']:.2f} -> {r['last_loss']:.3f}; eval loss "
        f"{r['eval_loss']:.3f} against a floor of {r['floor']:.3f} nats/token: {gap:.3f} above it.\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help="shorten the run (default: the preset's 300)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    command = "python experiments/default_run.py" + (f" --steps {args.steps}" if args.steps else "")
    result = {"meta": provenance(command, ("jax", "flax")), "run": run(args.steps)}
    write(result, Path(args.out))
    print((Path(args.out) / "default_run.md").read_text())
    return result


if __name__ == "__main__":
    main()
