"""`jaxllm bench`: time the jitted, sharded train step of a config on random tokens."""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxllm.config import Config, validate
from jaxllm.language_model import build
from jaxllm.sharding import logical_to_spec, make_mesh
from jaxllm.train.metrics import measured_peak_flops
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.step import init_state, make_train_step
from jaxllm.train.trainer import state_shardings


def bench(cfg: Config, steps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Compile time, median step time, tokens/s, MFU (vs the measured matmul peak), peak memory."""
    validate(cfg, jax.device_count())
    lm, tx = build(cfg), make_optimizer(cfg.train)
    mesh = make_mesh(cfg.mesh)
    make_state = partial(init_state, lm, tx, cfg.train.seed)
    state_sh = state_shardings(jax.eval_shape(make_state), lm.param_shardings(mesh), tx, mesh)
    batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "length"), lm.rules, dict(mesh.shape)))
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sh)
    step_fn = jax.jit(
        make_train_step(lm, tx, microbatches=cfg.train.microbatches, z_loss=cfg.train.z_loss),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,),
    )
    with jax.set_mesh(mesh):
        state = jax.jit(make_state, out_shardings=state_sh)()
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    peak = measured_peak_flops(cfg.model.dtype if cfg.model.dtype != "float16" else "float32") * jax.device_count()
    mem = jax.devices()[0].memory_stats() or {}
    return {
        "params": lm.num_params,
        "batch": B,
        "seq_len": T,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(lm.flops_per_token(T) * tokens_per_s / peak, 4),
        "peak_flops": round(peak / 1e9, 1),
        "peak_memory_bytes": mem.get("peak_bytes_in_use"),
        "loss": float(m["loss"]),
    }
