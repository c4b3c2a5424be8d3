"""`jaxllm ARGS` run as a user's shell would run it, for tests of the command line."""

import os
import subprocess
import sys


def jaxllm_process(*args: str, xla_flags: str = "") -> str:
    """`jaxllm ARGS` in a fresh process that sees one CPU device and XLA's default optimisation (or `xla_flags`);
    its standard output, after checking it exited 0."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    done = subprocess.run([sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout
