"""Huge-page malloc for XLA's host buffers (`jaxllm.host_memory`): when the `jaxllm` command re-executes itself, and
that it removes the page faults of a jitted computation's large temporaries."""

import os
import platform
import subprocess
import sys

import pytest

from jaxllm.host_memory import huge_page_environment, malloc_pages, transparent_huge_page_mode

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ, libc, thp, tunables", [
    ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
    ({}, GLIBC, "always", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({}, GLIBC, "never", None),
    ({}, ("glibc", "2.34"), "madvise", None),
    ({}, ("", ""), "madvise", None),  # musl and others: no such tunable
    ({"JAXLLM_HUGE_PAGES": "0"}, GLIBC, "madvise", None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's own choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, "madvise", None),  # already re-executed: no loop
])
def test_huge_page_environment(environ, libc, thp, tunables):
    env = huge_page_environment({"PATH": "/bin", **environ}, libc, thp)
    assert (env if env is None else env["GLIBC_TUNABLES"]) == tunables
    if env is not None:
        assert env["PATH"] == "/bin" and malloc_pages(env) == "huge pages"


def test_transparent_huge_page_mode(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert transparent_huge_page_mode(tmp_path / "enabled") == "madvise"
    assert transparent_huge_page_mode(tmp_path / "missing") == "never"


FAULTS = """
import os, resource
from jaxllm.host_memory import malloc_pages, reexec_with_huge_pages
reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum((x @ x.T) @ x))  # the [4096, 4096] f32 product between the dots: a 64 MiB temporary
x = jnp.ones((4096, 64)) * 1e-2
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(malloc_pages(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(huge_page_environment({}, platform.libc_ver(), transparent_huge_page_mode()) is None,
                    reason="this host has no glibc >= 2.35 with transparent huge pages")
def test_reexecution_removes_the_page_faults_of_large_temporaries():
    """A 64 MiB temporary is faulted in page by page on every call with default malloc (16,384 pages) and a few
    dozen times once the process has re-executed itself with huge-page malloc."""
    def faults(**env):
        clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLLM_HUGE_PAGES", "XLA_FLAGS")}
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                             env={**clean, **env}).stdout.split()
        return out[0] + " " + out[1], int(out[2])

    pages, n = faults()
    assert pages == "huge pages" and n < 2000, (pages, n)
    pages, n = faults(JAXLLM_HUGE_PAGES="0")
    assert pages == "default pages" and n > 8000, (pages, n)  # the control: the measurement sees the faults


def test_the_command_starts_before_jax_loads():
    """`jaxllm.cli` imports without jax (so its re-execution is cheap), and every exported name still resolves."""
    code = "import sys, jaxllm, jaxllm.cli; print('jax' in sys.modules, all(getattr(jaxllm, n) for n in jaxllm.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
