"""What every artifact records about how it was made: command, commit, date, machine and package versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from jaxllm.train.peak_flops import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def provenance(command: str, packages: tuple[str, ...] = ("jax", "flax", "torch")) -> dict:
    """{command, commit, dirty (the tracked files other than artifacts that differ from the commit: empty when
    clean), date (UTC), machine, python, <package>: version}. Artifacts (.json/.md/.png under experiments/) do not
    count: a script rewrites its own."""
    import psutil

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    changed = [line.split(maxsplit=1)[-1] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"command": command, "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": [path for path in changed
                      if not (path.startswith("experiments/") and path.endswith((".json", ".md", ".png")))],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {cpu_model()}",
            "python": platform.python_version(), **{pkg: metadata.version(pkg) for pkg in packages}}


def write_artifacts(results: Path, name: str, result: dict, markdown: list[str]) -> None:
    """`results/<name>.json` (the numbers with their provenance) and `results/<name>.md` (the table a reader sees)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text("\n".join(markdown) + "\n")
