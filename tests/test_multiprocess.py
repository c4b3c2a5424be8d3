"""Multi-process training on JAX's distributed runtime: 2 real OS processes x 4 CPU devices (gloo)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.config import load_config
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.setup import setup_step

from conftest import FAST_COMPILE

pytestmark = pytest.mark.slow
COMMON = ["--config", "tiny", "train.log_every=1", "data.synthetic_docs=600", "checkpoint.save_every=4",
          "checkpoint.keep_last=50", "train.eval_every=0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(run_dir, *overrides, processes=1, devices=8, wait=True):
    port = _port()
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "jaxllm.cli", "train", *COMMON, f"checkpoint.run_dir={run_dir}", *overrides]
        if processes > 1:
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    if not wait:
        return procs
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def _losses(run_dir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "train/loss" in d:
            out.setdefault(d["step"], []).append(d["train/loss"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp")
    _train(base / "one", "train.steps=12")  # 1 process x 8 devices
    _train(base / "two", "train.steps=12", processes=2, devices=4)
    return base


def test_two_processes_give_the_loss_sequence_of_one(runs):
    one, two = _losses(runs / "one"), _losses(runs / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    for step in one:  # same global batches; only all-reduce summation order differs
        assert two[step][0] == pytest.approx(one[step][0], abs=1e-5), step


def test_hybrid_mesh_with_data_over_dcn_gives_the_same_losses(runs, tmp_path):
    """2 processes as 2 DCN granules: data = 2 (DCN) x 2 (ICI), fsdp = 2 within each process."""
    _train(tmp_path / "hybrid", "train.steps=12", "mesh.dcn_data=2", "mesh.data=-1", "mesh.fsdp=2",
           processes=2, devices=4)
    one, hybrid = _losses(runs / "one"), _losses(tmp_path / "hybrid")
    assert sorted(hybrid) == list(range(1, 13))
    for step in one:
        assert hybrid[step][0] == pytest.approx(one[step][0], abs=1e-5), step


def _restore(run_dir, *mesh_overrides):
    cfg = load_config([Path(run_dir) / "config.yaml"], list(mesh_overrides))
    setup = setup_step(cfg)
    step, state, data = Checkpointer(Path(run_dir) / "checkpoints", cfg.checkpoint).restore_latest(setup.abstract_state)
    return cfg, setup, step, state


def test_checkpoint_of_two_processes_restores_in_one_process_on_another_mesh(runs):
    cfg, setup, step, state = _restore(runs / "two", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")
    assert step == 12 and jax.process_count() == 1
    q = state.params["blocks"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    _, ref_setup, _, ref = _restore(runs / "one")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state.params, ref.params)
    tokens = np.arange(64, dtype=np.int32).reshape(2, 32) % cfg.model.vocab_size
    with jax.set_mesh(setup.mesh):
        out = jax.jit(setup.lm.apply)(state.params, tokens)
    np.testing.assert_allclose(out, jax.jit(ref_setup.lm.apply)(ref.params, tokens), atol=1e-4)


def test_killed_process_stops_the_survivor_and_the_pair_resumes(runs, tmp_path):
    """SIGKILL one of a pair mid-run: the survivor stops; restarted, the pair resumes from the last checkpoint and
    ends with the losses of the uninterrupted pair (`runs / "two"`, same config)."""
    run, timeout = tmp_path / "killed", "--heartbeat-timeout=10"
    procs = _train(run, "train.steps=12", timeout, processes=2, devices=4, wait=False)
    deadline = time.time() + 240
    while len(_losses(run)) < 6 if (run / "metrics.jsonl").exists() else True:  # past the checkpoint at step 4
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "run ended before the kill"
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.time() - killed_at
    assert len(_losses(run)) < 12, "the kill came after the run finished"
    # the survivor stops (JAX's coordination service aborts it) within the heartbeat timeout + slack
    assert procs[0].returncode != 0 and waited < 10 + 30, (procs[0].returncode, waited, out[-3000:])
    # JAX's coordination service reports the missing heartbeat, or gloo the broken connection first
    tail = out[-4000:]
    assert re.search(r"heartbeat timeout|[Cc]onnection (closed|reset|refused)|peer|UNAVAILABLE|Barrier failed", tail), tail

    _train(run, "train.steps=12", timeout, processes=2, devices=4)  # restart the pair: resumes from a checkpoint
    straight, resumed = _losses(runs / "two"), _losses(run)
    assert sorted(resumed) == list(range(1, 13))
    assert any(len(v) > 1 for v in resumed.values()), "no step was run twice: the pair did not resume mid-run"
    for step, values in resumed.items():  # before the kill, and after the resume
        for v in values:
            assert v == pytest.approx(straight[step][0], abs=1e-5), step


def test_processes_with_different_configs_stop_with_a_clear_error(tmp_path):
    port = _port()
    procs = []
    for i, lr in enumerate(("1e-3", "2e-3")):
        cmd = [sys.executable, "-m", "jaxllm.cli", "train", *COMMON, f"checkpoint.run_dir={tmp_path}", "train.steps=3",
               f"train.learning_rate={lr}", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(i)]
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]  # the CLI's config-error exit code, no traceback
    assert all("config error: processes disagree on the config" in out for out in outs), outs[0][-2000:]
