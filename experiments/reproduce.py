"""Re-run every CPU benchmark and experiment behind a README number, then render the README from the artifacts.

    python experiments/reproduce.py                      # all of them, in order (about 2 hours on 2 cores)
    python experiments/reproduce.py --only moe,report    # a subset, by name
    python experiments/reproduce.py --quick --out DIR    # the experiments on tiny settings into DIR (the tests)

Each step is its own process, as a user runs it; a failing step stops the run with its output. The full run
rewrites the committed artifacts (experiments/results/, experiments/*/results.*); --quick writes only under --out
and never touches them or the README.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# name -> (full command, quick command or None: not run in --quick); "{out}" is the --quick output directory
STEPS: dict[str, tuple[list[str], list[str] | None]] = {
    "default_run": ([PY, "experiments/default_run.py"], None),
    "bench_vs_torch": ([PY, "experiments/bench_vs_torch.py"], None),
    "bench_decode": ([PY, "experiments/bench_decode.py"], None),
    "bench_finetune": ([PY, "experiments/bench_finetune.py"], None),
    "moe_bench_layer": ([PY, "experiments/moe/bench_layer.py"], None),
    "bench_ffn_skip": ([PY, "experiments/bench_ffn_skip.py"], None),
    "premerge": ([PY, "experiments/structured_ffn/bench_premerge.py"], None),
    "structured_ffn": ([PY, "experiments/structured_ffn/run.py"],
                       [PY, "experiments/structured_ffn/run.py", "--quick", "--steps", "2", "--seeds", "1",
                        "--out", "{out}/structured_ffn"]),
    "lora": ([PY, "experiments/lora/run.py"],
             [PY, "experiments/lora/run.py", "--quick", "--base-steps", "2", "--steps", "2", "--seeds", "2",
              "--out", "{out}/lora"]),
    "moe": ([PY, "experiments/moe/run.py"],
            [PY, "experiments/moe/run.py", "--quick", "--steps", "2", "--seeds", "1", "--out", "{out}/moe"]),
    "conditional_compute": ([PY, "experiments/moe/conditional_compute.py"],
                            [PY, "experiments/moe/conditional_compute.py", "--quick", "--base-steps", "4", "--steps", "3",
                             "--seeds", "1", "--out", "{out}/conditional_compute"]),
    "compress": ([PY, "experiments/compress/run.py"],
                 [PY, "experiments/compress/run.py", "--quick", "--base-steps", "2", "--maskllm-steps", "2", "--seeds",
                  "2", "--calib", "2", "--out", "{out}/compress"]),
    "report": ([PY, "experiments/report.py"], None),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--quick", action="store_true", help="tiny settings, outputs under --out only")
    ap.add_argument("--out", help="--quick: where the quick artifacts go")
    args = ap.parse_args(argv)
    if args.quick and not args.out:
        ap.error("--quick needs --out (it never rewrites the committed artifacts)")
    names = args.only.split(",") if args.only else list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    for name in names:
        full, quick = STEPS[name]
        if args.quick and quick is None:
            continue
        cmd = [a.replace("{out}", str(args.out)) for a in (quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
            print(f"== {name} failed (exit {done.returncode})", file=sys.stderr)
            return 1
        print(f"== {name} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
