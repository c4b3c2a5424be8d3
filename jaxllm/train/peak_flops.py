"""The denominator of MFU: a stable peak in FLOP/s, never re-measured on a busy machine.

GPUs and TPUs: the vendor's dense (no sparsity) figure for the device, at the precision jax runs a matmul
of that dtype with default precision (f32 on NVIDIA: TF32 tensor cores; on TPU: one bf16 pass).
CPUs (and unlisted accelerators): a jitted 2048 x 2048 matmul, best of 10, measured once per machine and
dtype and recorded in `$JAXLLM_CACHE/peak_flops.json` (default `~/.cache/jaxllm`) with the date, CPU and
versions; later runs read the record. Delete the record to re-measure (on an idle machine).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

# (device_kind substring, first match wins) -> dense TFLOP/s for {bfloat16, float32 at default precision}
SPEC_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
]


@dataclass(frozen=True)
class Peak:
    flops_per_s: float  # for the whole run: every device (accelerators) or every host (CPU)
    source: str  # where the figure comes from, for the log


def spec_peak(device_kind: str, dtype: str) -> float | None:
    """The datasheet FLOP/s of one device of this kind, or None when it is not in SPEC_TFLOPS."""
    for name, tflops in SPEC_TFLOPS:
        if name in device_kind:
            return tflops.get(dtype, tflops["float32"]) * 1e12
    return None


def record_path() -> Path:
    return Path(os.environ.get("JAXLLM_CACHE", Path.home() / ".cache" / "jaxllm")) / "peak_flops.json"


def machine_key(dtype: str) -> str:
    """What a recorded measurement is valid for: platform, device kind, CPU model, cores, dtype."""
    device = jax.devices()[0]
    return f"{device.platform}|{device.device_kind}|{cpu_model()}|{os.cpu_count()} cores|{dtype}"


def measure_matmul_flops(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n matmul on the default device, the best of `repeats`."""
    x = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(dtype: str) -> Peak:
    """The run's peak FLOP/s for matmuls in `dtype` (float16 counts as bfloat16)."""
    dtype = "bfloat16" if dtype == "float16" else dtype
    device = jax.devices()[0]
    spec = spec_peak(device.device_kind, dtype) if device.platform != "cpu" else None
    if spec is not None:
        return Peak(spec * jax.device_count(), f"{device.device_kind} datasheet, {dtype}, x{jax.device_count()}")
    path, key = record_path(), machine_key(dtype)
    records = json.loads(path.read_text()) if path.exists() else {}
    if key not in records:
        records[key] = {"flops_per_s": measure_matmul_flops(dtype), "measured": datetime.datetime.now().isoformat(
            timespec="seconds"), "jax": jax.__version__, "how": "jitted 2048x2048 matmul, best of 10"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)
    r = records[key]
    # CPU devices share the host's cores: one measurement per host; other devices: one per device
    count = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return Peak(r["flops_per_s"] * count, f"measured {r['measured']}, recorded in {path}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
