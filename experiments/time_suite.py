"""Time the whole test suite as CI runs it (`pytest` from the repository root) and write the artifact the
README's test-time sentence comes from: wall time, outcome, the 10 slowest tests, each test file's summed test
time (what to trim first when the suite nears its 10 minutes) and the peak memory of pytest and all its workers and
subprocesses together (sampled every 0.5 s), with command, commit, date, machine and versions.

    python experiments/time_suite.py            # -> experiments/results/test_suite_time.{md,json}
    python experiments/time_suite.py -- -x      # extra arguments after -- go to pytest
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def _tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(pytest_args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=0", *pytest_args]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def sample():
        watched = psutil.Process(proc.pid)
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(watched))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    done.set()
    wall = time.time() - start
    durations = re.findall(r"^([0-9.]+)s (call|setup|teardown)\s+(\S+)$", out, re.M)
    per_file: collections.Counter[str] = collections.Counter()
    for seconds, _, test in durations:
        per_file[test.split("::")[0]] += float(seconds)
    summary = re.findall(r"^=* ?(\d+ (?:passed|failed|error).*?) in [0-9.]+s", out, re.M)
    return {"returncode": proc.returncode, "wall_s": round(wall, 1), "summary": summary[-1] if summary else "",
            "slowest": [{"seconds": float(s), "phase": ph, "test": t} for s, ph, t in durations[:10]],
            "per_file_s": {f: round(t, 1) for f, t in per_file.most_common()},
            "peak_rss_gib": round(peak[0] / 2**30, 2), "log_tail": out[-3000:]}


def meta(pytest_args: list[str]) -> dict:
    command = "python experiments/time_suite.py" + (" -- " + " ".join(pytest_args) if pytest_args else "")
    return provenance(command, ("jax", "flax", "pytest", "pytest-xdist", "torch"))


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_suite_time.json").write_text(json.dumps(result, indent=2) + "\n")
    m, r = result["meta"], result["run"]
    lines = ["# Test suite time\n", f"`{m['command']}` at commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, "
             f"{m['date']}, {m['machine']}; python {m['python']}, jax {m['jax']}, pytest {m['pytest']}, "
             f"pytest-xdist {m['pytest-xdist']}, torch {m['torch']}.\n",
             f"**{r['wall_s'] / 60:.1f} min wall** ({r['wall_s']:.0f} s), exit code {r['returncode']}: {r['summary']}; "
             f"peak memory of pytest + workers + subprocesses {r['peak_rss_gib']} GiB.\n",
             "| seconds | phase | test |", "|---:|---|---|"]
    lines += [f"| {s['seconds']:.1f} | {s['phase']} | `{s['test']}` |" for s in r["slowest"]]
    if r.get("per_file_s"):
        lines += ["", "Summed test time per file (setup + call + teardown, across both workers; the 15 largest):", "",
                  "| seconds | file |", "|---:|---|"]
        lines += [f"| {t:.1f} | `{f}` |" for f, t in list(r["per_file_s"].items())[:15]]
    (out / "test_suite_time.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = ap.parse_args(argv)
    result = {"meta": meta(args.pytest_args), "run": run(args.pytest_args)}
    write(result, Path(args.out))
    print((Path(args.out) / "test_suite_time.md").read_text())
    return result


if __name__ == "__main__":
    sys.exit(main()["run"]["returncode"])
