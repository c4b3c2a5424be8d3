"""Host memory for XLA on CPU: large buffers on transparent huge pages (Linux with glibc >= 2.35).

XLA on CPU allocates an execution's temporaries as one block through malloc (for a training step, the size of all
its activations and scratch). glibc maps a block that large fresh from the kernel and unmaps it when it is freed, so
every step faults in and zeroes each 4 KiB page again (`experiments/results/bench_finetune.md` counts the faults and
the kernel CPU time per step). glibc's tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (2 MiB)
for such blocks. glibc reads tunables only when a process starts, so the `jaxllm` command re-executes itself once
with the tunable added (`reexec_with_huge_pages`), before jax is imported. Python scripts and notebooks get the same
by starting Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment. `JAXLLM_HUGE_PAGES=0` turns it
off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping

OPT_OUT = "JAXLLM_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
HUGE_PAGES = f"{TUNABLE}=1"  # malloc advises transparent huge pages for the blocks it maps
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_page_mode(path: Path = THP_MODE_FILE) -> str:
    """The kernel's transparent huge page mode (always, madvise or never); never when it cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "never"


def huge_page_environment(environ: Mapping[str, str], libc: tuple[str, str], thp_mode: str) -> dict[str, str] | None:
    """The environment to re-execute with (GLIBC_TUNABLES extended by glibc.malloc.hugetlb=1), or None when it
    would change nothing: not glibc >= 2.35, huge pages off in the kernel, the tunable already set (by the user
    or by an earlier re-execution), or JAXLLM_HUGE_PAGES=0."""
    name, version = libc
    if name != "glibc" or not version or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return None
    if thp_mode not in ("always", "madvise") or environ.get(OPT_OUT, "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE + "=" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def malloc_pages(environ: Mapping[str, str] = os.environ) -> str:
    """How this process's malloc backs large blocks, for run logs: huge pages or default pages."""
    return "huge pages" if HUGE_PAGES in environ.get("GLIBC_TUNABLES", "").split(":") else "default pages"


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with huge-page malloc, when `huge_page_environment` says it
    changes something; returns without doing anything otherwise. Call it first thing in a command's entry point."""
    if sys.platform != "linux" or not sys.executable:
        return
    env = huge_page_environment(os.environ, platform.libc_ver(), transparent_huge_page_mode())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
