"""The suite-timing script runs pytest, parses its outcome and slowest tests, and writes its artifact."""

import json
import sys

import pytest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))

import time_suite  # noqa: E402


@pytest.mark.slow  # a pytest subprocess; the suite-time artifact (experiments/results/test_suite_time.md) is its real run
def test_time_suite_writes_its_artifact(tmp_path):
    result = time_suite.main(["--out", str(tmp_path), "--", "tests/test_config.py", "-n", "0", "-q",
                              "--durations=10", "-k", "preset"])
    run = result["run"]
    assert run["returncode"] == 0 and "passed" in run["summary"] and run["slowest"], run["log_tail"]
    assert all(s["test"].startswith("tests/test_config.py::") for s in run["slowest"])
    assert list(run["per_file_s"]) == ["tests/test_config.py"] and run["per_file_s"]["tests/test_config.py"] > 0
    assert 0 < run["peak_rss_gib"] < 8 and run["wall_s"] > 0
    saved = json.loads((tmp_path / "test_suite_time.json").read_text())
    assert saved["meta"]["commit"] and saved["meta"]["jax"] and "-- tests/test_config.py" in saved["meta"]["command"]
    assert "min wall" in (tmp_path / "test_suite_time.md").read_text()
