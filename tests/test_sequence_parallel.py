"""A whole model with each row split over a `sequence` mesh axis (context parallelism) computes what one device
does: loss and gradients of `lm.loss` on packed rows with chunked loss, ring and all-gather, with the zigzag layout
and without, on `sequence=4` and on `sequence=2, fsdp=2, tensor=2`; and a run resumes across a checkpoint taken on
another mesh."""

import json
import shutil
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jaxllm.config import ConfigError, load_config, validate
from jaxllm.language_model import build
from jaxllm.sharding import logical_to_spec, make_mesh
from jaxllm.train.trainer import train

MESHES = {"sequence4": ["mesh.data=2", "mesh.sequence=4"],
          "sequence2_fsdp2_tensor2": ["mesh.data=1", "mesh.sequence=2", "mesh.fsdp=2", "mesh.tensor=2"]}


def _packed_batch(B: int, T: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    seg = np.ones((B, T), np.int32)
    seg[0, 21:], seg[0, 50:] = 2, 3  # row 0 packs three documents
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(seg[b]):
            pos[b, seg[b] == s] = np.arange((seg[b] == s).sum())
    return {"inputs": rng.integers(0, vocab, (B, T)).astype(np.int32),
            "targets": rng.integers(0, vocab, (B, T)).astype(np.int32),
            "loss_mask": (rng.random((B, T)) < 0.9).astype(np.float32), "positions": pos, "segment_ids": seg}


@pytest.mark.parametrize("mesh, method, zigzag", [("sequence4", "ring", True),
                                                  ("sequence2_fsdp2_tensor2", "allgather", False)])
def test_model_loss_and_gradients_with_the_sequence_split_equal_one_device(mesh, method, zigzag):
    cfg = load_config(["tiny"], [*MESHES[mesh], f"model.attention.context_parallel={method}",
                                 f"model.attention.zigzag={str(zigzag).lower()}", "model.loss_chunk_tokens=64",
                                 "model.attention.sliding_window=24"])
    validate(cfg, jax.device_count())
    lm = build(cfg)
    params = lm.init(jax.random.key(0))
    batch = _packed_batch(4, cfg.data.seq_len, cfg.model.vocab_size)
    loss_and_grad = jax.value_and_grad(lambda p, b: lm.loss(p, b)[0])
    want_loss, want_grads = jax.jit(loss_and_grad)(params, batch)

    device_mesh = make_mesh(cfg.mesh)
    rows = jax.sharding.NamedSharding(device_mesh, logical_to_spec(("batch", "length"), lm.rules, dict(device_mesh.shape)))
    assert rows.spec[1] == "sequence"  # each row really is split
    with jax.set_mesh(device_mesh):
        sharded = jax.device_put(params, lm.param_shardings(device_mesh))
        step = jax.jit(loss_and_grad)
        got_loss, got_grads = step(sharded, jax.device_put(batch, rows))
        traced = str(jax.make_jaxpr(loss_and_grad)(sharded, jax.device_put(batch, rows)))
    assert ("ppermute" in traced) == (method == "ring") and ("shard_map" in traced)  # context-parallel attention
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, atol=2e-6, rtol=2e-4)


@pytest.mark.slow  # whole runs on two meshes; the sharded step's equality with one device is the default tests' claim
def test_a_run_resumes_on_another_mesh_as_it_would_have_gone_on(tmp_path):
    """Steps 3-4 after a checkpoint taken on `sequence=4` and restored on `sequence=2, fsdp=2, tensor=2` match the
    uninterrupted `sequence=4` run (up to the meshes' different reduction orders)."""
    common = ["train.steps=4", "train.log_every=1", "train.eval_every=0", "checkpoint.save_every=2",
              "checkpoint.keep_last=5", "checkpoint.async_save=false", "data.synthetic_docs=600"]
    losses = lambda run: [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                          if "train/loss" in line]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train(load_config(["tiny", "mesh/cp"], [*common, f"checkpoint.run_dir={straight}"]))
    shutil.copytree(straight, moved)  # as if stopped right after saving step 2
    shutil.rmtree(moved / "checkpoints" / "4")
    result = train(load_config([moved / "config.yaml"], [*MESHES["sequence2_fsdp2_tensor2"],
                                                         f"checkpoint.run_dir={moved}"]))
    assert result.start_step == 2
    np.testing.assert_allclose(losses(moved)[-2:], losses(straight)[-2:], rtol=2e-5)  # steps 3 and 4


def test_activation_memory_per_device_falls_with_the_sequence_axis():
    """XLA's own accounting of the compiled loss + gradient program (experiments/context_memory.py, small): one
    row over 4 devices needs at most a third of one device's temporary memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from context_memory import QUICK, measure

    one, four = (measure(512, QUICK["model"], n, "ring", "dots_no_batch")["temp_bytes"] for n in (1, 4))
    assert four < one / 3


def test_a_row_that_cannot_be_split_evenly_is_a_config_error():
    cfg = load_config(["tiny", "mesh/cp"], ["data.seq_len=36"])
    with pytest.raises(ConfigError, match=r"data.seq_len=36 must be a multiple of 8 to split each row over 4 devices"):
        validate(cfg, jax.device_count())
    validate(load_config(["tiny", "mesh/cp"], ["data.seq_len=36", "model.attention.zigzag=false"]), 8)  # 36 = 4 x 9
