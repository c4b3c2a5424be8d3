"""Training: loss goes down, exact resume after SIGKILL, SIGTERM saves, gradient accumulation,
sharded step == single device, checkpoint fallbacks and errors, tensorboard files."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import ConfigError, TrainConfig, load_config
from jaxllm.language_model import build
from jaxllm.train.optimizer import decay_mask, make_schedule
from jaxllm.train.step import init_state, make_train_step
from jaxllm.train.trainer import train

from conftest import FAST_COMPILE

FAST = ["data.synthetic_docs=600", "train.log_every=1", "checkpoint.async_save=false"]


def _cfg(run_dir, *overrides, files=("tiny",)):
    return load_config(list(files), [f"checkpoint.run_dir={run_dir}", *FAST, *overrides])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    result = train(_cfg(run, "train.steps=30", "train.eval_every=10", "checkpoint.save_every=10", "checkpoint.keep_last=3"))
    return run, result


def test_training_lowers_the_loss(trained_run):
    _, r = trained_run
    assert sorted(r.losses) == list(range(1, 31))
    assert r.losses[1] == pytest.approx(np.log(320), rel=0.05)  # uniform over the vocabulary at init
    assert r.losses[30] < 0.6 * r.losses[1]
    assert r.eval_loss is not None and r.eval_loss < 0.6 * r.losses[1]
    assert 0.75 < r.floor < 0.95  # exact entropy of the 12 held-out documents (checked in test_data)


def test_tensorboard_event_files_read_back(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, r = trained_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/mfu", "eval/loss"} <= set(tags["scalars"])
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == list(range(1, 31))
    np.testing.assert_allclose([loss[s] for s in sorted(loss)], [r.losses[s] for s in sorted(r.losses)], rtol=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [10, 20, 30]
    assert "config" in tags["tensors"]
    assert b"num_layers: 2" in acc.Tensors("config")[0].tensor_proto.string_val[0]


def test_corrupted_newest_checkpoint_falls_back_and_says_so(trained_run, tmp_path, capsys):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints" / "30" / "state").rglob("*"):
        if f.is_file() and "ocdbt.process_0" in str(f):
            f.write_bytes(b"garbage")
    r = train(_cfg(copy, "train.steps=31"))
    out = capsys.readouterr().out
    assert "checkpoint at step 30 is unreadable" in out and "falling back" in out
    assert r.start_step == 20 and r.end_step == 31


def test_checkpoint_of_a_different_model_shape_is_a_clear_error(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"holds a checkpoint \(step 30\) of a different model shape: .*saved \(2, 64, 128\), config \(2, 64, 96\)"):
        train(_cfg(copy, "train.steps=40", "model.mlp.d_ff=96"))


def _run_cli(run_dir, *overrides, wait=True):
    cmd = [sys.executable, "-m", "jaxllm.cli", "train", "--config", "tiny", f"checkpoint.run_dir={run_dir}", *FAST, *overrides]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


def _losses(run_dir):
    import json

    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "train/loss" in d:
            losses.setdefault(d["step"], []).append(d["train/loss"])
    return losses


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    steps = ["train.steps=30", "checkpoint.save_every=6"]
    rc, out = _run_cli(tmp_path / "straight", *steps)
    assert rc == 0, out
    straight = _losses(tmp_path / "straight")

    run = tmp_path / "killed"
    proc = _run_cli(run, *steps, wait=False)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "12" / "commit_success.txt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = _losses(run)
    assert max(killed) < 30, "the kill came after the run finished"

    rc, out = _run_cli(run, "train.steps=30")  # same dir: resumes with the saved config
    assert rc == 0, out
    assert "resuming from step" in out
    resumed = _losses(run)
    for step, values in resumed.items():  # every logged value (before and after the kill) is bit-identical
        for v in values:
            assert v == straight[step][0], step
    assert sorted(resumed) == list(range(1, 31))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    proc = _run_cli(tmp_path, "train.steps=100000", "checkpoint.save_every=100000", wait=False)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() or len(_losses(tmp_path)) < 5:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "received signal 15: saved step" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and saved[0] >= 5


def test_gradient_accumulation_equals_the_big_batch():
    cfg = load_config(["tiny"])
    lm = build(cfg)
    # SGD: the update is linear in the gradient, so parameters compare as tightly as gradients do
    # (Adam's first step is ~lr * sign(g), which amplifies rounding noise on near-zero gradients).
    tx = optax.sgd(0.5)
    state = init_state(lm, tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, 320, (8, 32)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 320, (8, 32)), jnp.int32),
        # uneven masks: microbatches hold different token counts, so naive mean-of-means would differ
        "loss_mask": jnp.asarray(rng.random((8, 32)) < np.linspace(0.2, 1.0, 8)[:, None], jnp.float32),
    }
    big_state, big = jax.jit(make_train_step(lm, tx))(state, batch)
    acc_state, acc = jax.jit(make_train_step(lm, tx, microbatches=4))(state, batch)
    np.testing.assert_allclose(acc["loss"], big["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["grad_norm"], big["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(acc_state.params, big_state.params, atol=1e-6, rtol=1e-5)


def test_method_regularizers_and_update_masks_enter_the_step_as_their_formula_says():
    """SGD (lr 1): a term c/2 * sum(w^2) adds c * w to every gradient, so the two runs' params differ by exactly
    -c * w where the mask lets a leaf train; masked entries keep their values bitwise, adamw's decay included."""
    lm = build(load_config(["tiny"]))
    rng = np.random.default_rng(2)
    batch = {"inputs": jnp.asarray(rng.integers(0, 320, (4, 16)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 320, (4, 16)), jnp.int32)}
    c = 0.25
    l2 = lambda params, frozen: {"l2": 0.5 * c * sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(params))}
    rows = lambda params: jax.tree.map(lambda w: (np.arange(w.shape[0]) % 2 == 0).reshape(-1, *[1] * (w.ndim - 1))
                                       if w.ndim > 1 else None, params)  # even rows of every matrix train
    tx = optax.sgd(1.0)
    state = init_state(lm, tx, seed=0)
    plain_state, plain = jax.jit(make_train_step(lm, tx, update_mask=rows))(state, batch)
    term_state, term = jax.jit(make_train_step(lm, tx, regularizers=l2, update_mask=rows))(state, batch)
    w0 = jax.tree.leaves(state.params)
    expected_term = 0.5 * c * sum(float(np.sum(np.square(np.asarray(w, np.float64)))) for w in w0)
    np.testing.assert_allclose(term["method/l2"], expected_term, rtol=1e-5)
    np.testing.assert_allclose(term["loss"], plain["loss"] + expected_term, rtol=1e-5)
    for w, a, b in zip(w0, jax.tree.leaves(plain_state.params), jax.tree.leaves(term_state.params)):
        w, a, b = np.asarray(w), np.asarray(a), np.asarray(b)
        keep = np.broadcast_to((np.arange(w.shape[0]) % 2 == 0).reshape(-1, *[1] * (w.ndim - 1)) if w.ndim > 1
                               else np.ones(w.shape, bool), w.shape)
        np.testing.assert_allclose(b[keep] - a[keep], -c * w[keep], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(a[~keep], w[~keep])
        np.testing.assert_array_equal(b[~keep], w[~keep])
    adamw = optax.adamw(1e-2, weight_decay=0.5)
    decayed, _ = jax.jit(make_train_step(lm, adamw, update_mask=rows))(init_state(lm, adamw, seed=0), batch)
    for w, d in zip(w0, jax.tree.leaves(decayed.params)):
        if w.ndim > 1:
            np.testing.assert_array_equal(np.asarray(d)[1::2], np.asarray(w)[1::2])


def test_sharded_train_step_matches_single_device():
    cfg = load_config(["tiny", "mesh/fsdp_tp"])
    lm = build(cfg)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
    rng = np.random.default_rng(1)
    batches = [
        {"inputs": jnp.asarray(rng.integers(0, 320, (8, 32)), jnp.int32),
         "targets": jnp.asarray(rng.integers(0, 320, (8, 32)), jnp.int32)}
        for _ in range(2)
    ]
    step = make_train_step(lm, tx)
    ref = init_state(lm, tx, seed=0)
    ref_losses = []
    for b in batches:
        ref, m = jax.jit(step)(ref, b)
        ref_losses.append(float(m["loss"]))

    from jaxllm.sharding import make_mesh
    from jaxllm.train.setup import state_shardings

    mesh = make_mesh(cfg.mesh)
    state_sh = state_shardings(jax.eval_shape(lambda: init_state(lm, tx, 0)), lm.param_shardings(mesh), tx, mesh)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("fsdp",)))
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: init_state(lm, tx, 0), out_shardings=state_sh)()
        sharded_step = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
        losses = []
        for b in batches:
            state, m = sharded_step(state, jax.device_put(b, batch_sh))
            losses.append(float(m["loss"]))
    assert state.params["blocks"]["mlp"]["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(state.params, ref.params, atol=1e-6, rtol=1e-5)  # f32, 2 SGD steps


def test_schedules_and_weight_decay_mask():
    values = lambda kind: [float(make_schedule(TrainConfig(steps=100, warmup_steps=10, schedule=kind, learning_rate=1.0, min_lr_ratio=0.1))(s)) for s in (0, 5, 10, 55, 100)]
    np.testing.assert_allclose(values("cosine"), [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose(values("linear"), [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose(values("constant"), [0, 0.5, 1.0, 1.0, 1.0], atol=1e-6)
    wsd = make_schedule(TrainConfig(steps=100, warmup_steps=10, schedule="wsd", learning_rate=1.0, min_lr_ratio=0.0, wsd_decay_fraction=0.2))
    np.testing.assert_allclose([float(wsd(s)) for s in (10, 81, 91, 100)], [1.0, 1.0, 0.5, 0.0], atol=1e-6)
    params = build(load_config(["tiny"], ["model.bias=all", "model.position=learned"])).param_shapes
    mask = decay_mask(params)
    assert mask["blocks"]["attn"]["q"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["blocks"]["attn"]["q"]["bias"] and not mask["blocks"]["attn_norm"]["scale"]
    assert not mask["pos_embed"]["embedding"] and not mask["final_norm"]["scale"]


def test_training_on_a_local_file_skips_bad_documents(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(b"\n\n".join([b"hello world %d, a small document" % i for i in range(40)] + [b"bad \xff\xfe bytes"]))
    r = train(_cfg(tmp_path / "run", "train.steps=3", f"data.source={data}", "data.eval_fraction=0.1"))
    assert "skipped 1 bad documents" in capsys.readouterr().out
    assert r.end_step == 3 and r.floor is None


def test_vocab_smaller_than_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab_size=256 is smaller than the tokenizer's vocabulary \(259"):
        train(_cfg(tmp_path, "model.vocab_size=256"))


# adamw, the default, trains in every other training test: its cell is in the slow set
@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "lion", "adafactor"])
def test_every_optimizer_trains(optimizer, tmp_path):
    lr = {"adamw": 1e-2, "lion": 1e-3, "adafactor": 1.0}[optimizer]  # adafactor scales updates by param RMS (~0.02)
    r = train(_cfg(tmp_path, "train.steps=20", f"train.optimizer={optimizer}", f"train.learning_rate={lr}",
                   "train.eval_every=0", "data.eval_fraction=0", "checkpoint.save_every=1000"))
    assert r.losses[20] < 0.85 * r.losses[1], r.losses


def test_keep_last_and_keep_every_and_incomplete_saves_are_ignored(tmp_path):
    from jaxllm.config import CheckpointConfig
    from jaxllm.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path, CheckpointConfig(keep_last=2, keep_every=4, async_save=False))
    state = {"w": jnp.arange(3.0)}
    for step in range(1, 9):
        ck.save(step, {"w": state["w"] + step}, {"next": step})
    ck.wait()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 7, 8]
    # a save interrupted mid-write leaves only orbax's temporary directory: it is never restored
    shutil.copytree(tmp_path / "8", tmp_path / "9.orbax-checkpoint-tmp-1234")
    (tmp_path / "9.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink(missing_ok=True)
    ck.close()
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    step, restored, data = Checkpointer(tmp_path, CheckpointConfig()).restore_latest(abstract)
    assert step == 8 and data == {"next": 8}
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 8)
