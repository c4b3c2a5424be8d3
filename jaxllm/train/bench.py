"""`jaxllm bench`: time the jitted, sharded train step of a config on random tokens."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np

from jaxllm.config import Config
from jaxllm.train.peak_flops import peak_flops
from jaxllm.train.setup import setup_step


def median_seconds(fn, *args, reps: int = 10) -> float:
    """Median wall seconds of `fn(*args)` (blocked until ready) over `reps` calls after one warm-up call
    (which also compiles). Shared by the benchmark scripts in `experiments/`."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(cfg: Config, steps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Compile time, median step time, tokens/s, MFU (vs `peak_flops`: datasheet or recorded measurement), peak memory."""
    s = setup_step(cfg)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    batch = s.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    with jax.set_mesh(s.mesh):
        state = s.init()
        t0 = time.perf_counter()
        compiled = s.train_step.lower(state, batch, s.frozen).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, m = compiled(state, batch, s.frozen)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch, s.frozen)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    peak = peak_flops(cfg.model.dtype)
    mem = jax.devices()[0].memory_stats() or {}
    return {
        "params": s.lm.num_params,
        "batch": B,
        "seq_len": T,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(s.flops_per_token(T) * tokens_per_s / peak.flops_per_s, 4),
        "peak_flops": round(peak.flops_per_s / 1e9, 1),
        "peak_source": peak.source,
        "peak_memory_bytes": mem.get("peak_bytes_in_use"),
        "loss": float(m["loss"]),
    }
