"""The experiments behind the README's method results run end to end on tiny settings (`reproduce.py --quick`), so
none of them rots; the committed artifacts are never touched by it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_COMPILE

ROOT = Path(__file__).parents[1]


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one CPU device, as a user's process has
    return subprocess.run([sys.executable, "experiments/reproduce.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_quick_reproduce_runs_the_three_experiments(tmp_path):
    done = _reproduce("--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("structured_ffn", "lora", "moe")}
    for name, r in results.items():
        assert r["commit"] and r["date"] and "cores" in r["machine"] and r["jax"], name  # provenance
        assert any(line.startswith("- ") for line in r["claims"]), name  # at least one claim checked
        assert (tmp_path / name / "results.png").stat().st_size > 10_000, name
        assert r["command"] in (tmp_path / name / "results.md").read_text(), name

    s = results["structured_ffn"]
    assert len(s["runs"]) == 2 * 2  # sizes x (dense, lowrank 32%), one seed
    dense, lowrank = s["table"]["dense"], s["table"]["lowrank 32%"]
    assert all(a < b for a, b in zip(lowrank["params"], dense["params"]))
    assert all(a < b for a, b in zip(lowrank["flops"], dense["flops"]))
    assert len(dense["slopes"]) == 1 and len(dense["losses"]) == 2  # a scaling fit per seed, a loss per size

    lora = results["lora"]["runs"]
    assert lora["lora|0"]["trainable"] < lora["full|0"]["trainable"] / 10
    assert lora["lora|0"]["optimizer_bytes"] < lora["full|0"]["optimizer_bytes"] / 10
    assert lora["lora|0"]["losses"] != lora["lora|1"]["losses"]  # a seed changes the run
    for r in lora.values():
        assert 0 <= r["held_out_accuracy"] <= 1 and 0 < r["held_out_loss"] < 20 and 0 < r["pretrain_eval_loss"] < 20

    moe = results["moe"]["runs"]
    assert moe["MoE top-2|0"]["params"] > moe["dense|0"]["params"]
    assert moe["MoE top-2|0"]["experts_per_token"] == pytest.approx(2.0)  # no null experts: every choice is real


def test_quick_reproduce_refuses_to_overwrite_the_committed_artifacts():
    done = _reproduce("--quick")
    assert done.returncode == 2 and "--quick needs --out" in done.stderr
    done = _reproduce("--only", "nonsense")
    assert done.returncode == 2 and "unknown step(s) nonsense" in done.stderr
