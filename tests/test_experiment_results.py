"""The experiments' shared bookkeeping (experiments/real_text.py): the two-std rule that decides what the README may
call a difference, and the results file that lets an interrupted experiment resume without mixing incomparable runs."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))

from real_text import Results, compare, differs, mean_std  # noqa: E402


def test_two_std_rule_by_the_formula():
    a, b = [1.0, 1.2, 1.4], [2.0, 2.2, 2.4]  # std 0.2 each: the difference's std is 0.2 * sqrt(2 / 3) = 0.163
    assert mean_std(a) == pytest.approx((1.2, 0.2))
    assert differs(a, b)  # 1.0 > 2 * 0.163
    near = [1.4, 1.6, 1.8]  # 0.4 apart: 0.4 > 0.327 but < 3 std (0.49): the rule is two std, not three
    assert differs(a, near)
    close = [1.3, 1.5, 1.7]  # 0.3 apart: 0.3 < 0.327, not one
    assert not differs(a, close) and 0.3 < 2 * 0.2 * math.sqrt(2 / 3)
    assert "no difference at this scale" in compare(a, close, "x", "y")
    assert compare(b, a, "x", "y").startswith("y has the lower eval loss by 1.000")


def test_results_resume_only_runs_of_the_same_settings_and_base(tmp_path):
    path = tmp_path / "results.json"
    first = Results(path, {"commit": "aaa", "settings": {"steps": 10, "shape": (1, 2)}})
    first.add("lora|0", {"loss": 1.0})
    first.save(base={"loss": 5.0})
    assert json.loads(path.read_text())["runs"]["lora|0"] == {"loss": 1.0, "commit": "aaa"}

    again = Results(path, {"commit": "bbb", "settings": {"steps": 10, "shape": (1, 2)}})  # tuples survive JSON
    assert "lora|0" in again
    again.require_same("base", {"loss": 5.0})
    with pytest.raises(SystemExit, match="base is .*'loss': 5.5.* but the recorded runs had"):
        again.require_same("base", {"loss": 5.5})
    again.add("pissa|0", {"loss": 0.9})
    assert again.commits() == ["aaa", "bbb"]

    other = Results(path, {"commit": "ccc", "settings": {"steps": 20, "shape": (1, 2)}})
    assert "lora|0" not in other and other.runs == {}
    other.require_same("base", {"loss": 7.0})  # nothing resumed: nothing to be the same as
