"""OpenMoE's routing diagnostics and the inter-layer mutual information, each against a hand count on constructed
routings; `jaxllm moe-report` on a tiny MoE run directory."""

import json
import math

import numpy as np
import pytest

from jaxllm.moe.diagnostics import (choice_agreement, drop_rate_by_position, interlayer_mutual_information,
                                    mutual_information, token_id_routing)


def test_token_id_share_by_hand():
    tokens = [1, 1, 1, 1, 2, 2, 2, 2, 3]  # id 3 is seen once: left out at min_count=2
    experts = [[0, 0, 0, 1, 1, 1, 2, 2, 0],
               [2, 2, 2, 2, 0, 0, 0, 0, 1]]
    f = token_id_routing(tokens, experts, min_count=2, seed=3)
    # layer 0: id 1 -> expert 0 three times of 4, id 2 -> expert 1 (or 2) twice of 4: 5/8
    np.testing.assert_allclose(f.value, [5 / 8, 1.0])
    # baseline: the same count with the 8 ids shuffled (seed 3's permutation), by hand
    t = np.random.default_rng(3).permutation(tokens[:8])
    want = [sum(max(np.sum((t == i) & (np.array(e[:8]) == x)) for x in range(3)) for i in (1, 2)) / 8 for e in experts]
    np.testing.assert_allclose(f.baseline, want)
    with pytest.raises(ValueError, match="no token id occurs 5 times"):
        token_id_routing(tokens, experts, min_count=5)


def test_checkpoint_agreement_by_hand():
    f = choice_agreement([[0, 1, 1, 2]], [[0, 1, 2, 2]])
    # 3 of 4 agree; loads (1/4, 2/4, 1/4) and (1/4, 1/4, 2/4): chance 1/16 + 2/16 + 2/16
    np.testing.assert_allclose(f.value, [3 / 4])
    np.testing.assert_allclose(f.baseline, [5 / 16])


def test_drop_rate_by_position_by_hand():
    expert = np.array([[[0], [1], [0], [3]]])  # slot 3 is a null expert (3 real ones): not a real choice
    dropped = np.array([[[False], [False], [True], [True]]])
    f, starts = drop_rate_by_position(dropped, expert, np.array([0, 1, 2, 3]), num_experts=3, buckets=2)
    np.testing.assert_allclose(f.value, [0.0, 1.0])  # positions 0-1: 0 of 2 dropped; 2-3: 1 of 1 real
    np.testing.assert_allclose(f.baseline, [1 / 3, 1 / 3])
    assert starts.tolist() == [0, 2]


def test_mutual_information_equals_the_definition():
    a, b = np.array([0, 0, 0, 1, 0, 2]), np.array([0, 0, 1, 1, 2, 2])
    pa = {x: np.mean(a == x) for x in set(a)}
    pb = {y: np.mean(b == y) for y in set(b)}
    want = sum(np.mean((a == x) & (b == y)) * math.log(np.mean((a == x) & (b == y)) / (pa[x] * pb[y]))
               for x in pa for y in pb if np.any((a == x) & (b == y)))
    assert mutual_information(a, b) == pytest.approx(want)
    assert mutual_information([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(math.log(2))
    assert mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    mi, nmi = interlayer_mutual_information(np.array([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]]))
    np.testing.assert_allclose(nmi, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(mi[0, 1], math.log(2))


def test_moe_report_cli_on_a_tiny_moe_run(tmp_path, capsys):
    from jaxllm.cli import main

    run = tmp_path / "moe"
    assert main(["train", "--config", "tiny", f"checkpoint.run_dir={run}", "train.steps=2", "train.eval_every=0",
                 "checkpoint.save_every=1", "checkpoint.async_save=false", "model.moe.num_experts=4",
                 "model.moe.top_k=2", "model.moe.d_ff=32", "model.moe.dispatch=capacity"]) == 0
    capsys.readouterr()
    assert main(["moe-report", str(run), "--batches", "1", "--capacity-factor", "0.5", "--min-count", "4"]) == 0
    out = capsys.readouterr().out
    assert "MoE routing report" in out and "agreement with step 1" in out and "routing decided by token id" in out
    r = json.loads((run / "moe_report" / "report.json").read_text())
    assert r["step"] == 2 and r["early_step"] == 1 and r["layers"] == ["layer 0", "layer 1"]
    assert 0.5 * 8 * 64 < r["tokens"] <= 8 * 64 and r["dispatch"] == "capacity"  # padding left out
    # capacity factor 0.5: at least half of the real choices cannot run
    assert r["drop_rate_overall"] >= 0.5 and all(0 <= x <= 1 for x in r["drop_rate_by_position"])
    assert all(0 < a <= 1 for a in r["agreement"]) and len(r["normalized_mi"]) == 2
    assert (run / "moe_report" / "report.md").read_text().startswith("# MoE routing report")
    assert any((run / "moe_report" / "tensorboard").iterdir())
