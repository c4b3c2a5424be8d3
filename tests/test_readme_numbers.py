"""Every measured sentence in the README is rendered from its artifact (experiments/report.py): a README
number that differs from its artifact, or a report block without an artifact, fails here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))

import report  # noqa: E402

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_numbers_equal_their_artifacts():
    blocks = {m.group(1): m.group(0) for m in report.BLOCK.finditer(README)}
    assert set(blocks) == set(report.REPORTS)  # every report is in the README, and only those
    stale = [block for block in blocks.values() if block not in report.update(README)]
    assert not stale, "README differs from experiments/results; run python experiments/report.py:\n" + "\n".join(stale)


def test_a_retyped_number_is_caught():
    block = next(report.BLOCK.finditer(README)).group(0)
    edited = README.replace(block, block.replace("<!-- /report -->", " (about 10% faster)<!-- /report -->"))
    assert report.update(edited) != edited
