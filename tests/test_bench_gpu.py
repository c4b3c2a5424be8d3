"""The GPU benchmark script runs end to end on tiny shapes (`--smoke`), so it cannot rot between GPU runs:
every row is measured (none failed), every section present, the artifact written with its metadata."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))

import bench_gpu  # noqa: E402


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    result = bench_gpu.main(["--smoke", "--out", str(tmp_path)])
    sections = ("block_diagonal", "ffn_layer", "attention", "train_step")
    assert all(result[s] for s in sections)
    for section in sections:
        for row in result[section]:
            assert not any(isinstance(v, str) and v.startswith("failed") for v in row.values()), row
    assert {r["structure"] for r in result["ffn_layer"]} == {"dense", "lowrank", "blockdense", "blockshuffle"}
    assert {r["docs_per_row"] for r in result["attention"]} == {1, 8}
    saved = json.loads((tmp_path / "bench_gpu_smoke.json").read_text())
    assert saved["meta"]["command"] == "python experiments/bench_gpu.py --smoke" and saved["meta"]["jax"]
    assert "## train step" in (tmp_path / "bench_gpu_smoke.md").read_text()
