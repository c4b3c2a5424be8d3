"""Multi-process runs on JAX's own multi-controller runtime.

`initialize` wraps `jax.distributed.initialize` (auto-detected on Cloud TPU and SLURM; explicit
coordinator/process counts elsewhere, e.g. several processes on one machine with CPU collectives
over gloo). Host-side helpers exchange small JSON values between processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from jaxllm.config import ConfigError


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int = 100,
) -> None:
    """Join the run's processes. Arguments fall back to JAXLLM_COORDINATOR / JAXLLM_NUM_PROCESSES /
    JAXLLM_PROCESS_ID; with none at all, JAX auto-detects (TPU pods, SLURM) or this stays one process.

    When a process dies, JAX's coordination service stops the others once `heartbeat_timeout_s`
    passes without its heartbeat (they abort with a message naming the missing task), so no
    survivor hangs in a collective; restart every process to resume from the last checkpoint.
    """
    coordinator = coordinator or os.environ.get("JAXLLM_COORDINATOR")
    if num_processes is None and "JAXLLM_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXLLM_NUM_PROCESSES"])
    if process_id is None and "JAXLLM_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXLLM_PROCESS_ID"])
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    auto = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if not explicit and not auto:
        return
    if explicit and None in (coordinator, num_processes, process_id):
        raise ValueError("multi-process runs need all of --coordinator, --num-processes and --process-id")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only; harmless elsewhere
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)


def all_processes_agree(flag: bool) -> bool:
    """True if `flag` is True on any process (every process gets the same answer)."""
    return any(allgather_json(bool(flag)))


def merged_state(local: dict[str, Any]) -> dict[str, Any]:
    """The union of every process's dict (e.g. per-row iterator states)."""
    merged: dict[str, Any] = {}
    for part in allgather_json(local):
        merged.update(part)
    return merged


def allgather_json(value: Any) -> list[Any]:
    """Every process's `value` (JSON-serialisable), in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


def check_same_config(config_yaml: str) -> None:
    """A clear error when processes were started with different configs."""
    digest = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
    digests = allgather_json(digest)
    if len(set(digests)) > 1:
        raise ConfigError(f"processes disagree on the config (digests by process: {digests}); start every "
                         "process with the same --config files and overrides")
