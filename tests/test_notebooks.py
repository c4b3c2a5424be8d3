"""Every notebook in notebooks/ runs top to bottom on tiny settings; each asserts in its own cells what it
claims (loss well below a uniform guess, merged == factored, the adapter beats the base on held-out prompts),
so a cell error or a broken claim fails the test."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import FAST_COMPILE

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
TINY = "STEPS = 15\nPRESET = 'tiny'\nFT_STEPS = 40"  # lora_finetune: enough steps on the tiny base for its held-out claim


# the quickstart runs in every suite; the longer notebooks (each trains several runs) with `pytest -m slow`
@pytest.mark.parametrize("path", [p if p.name == "quickstart.ipynb" else pytest.param(p, marks=pytest.mark.slow)
                                  for p in NOTEBOOKS], ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params, f"{path.name} needs a cell tagged 'parameters' so tests can shrink it"
    params[0].source = TINY
    # the kernel sees one CPU device, as on Colab or a laptop (not the suite's 8 fake devices)
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    # every cell ran (each notebook asserts its own claims in its cells, so a broken claim is a cell error)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code" and c.source.strip())


def test_there_are_notebooks():
    assert NOTEBOOKS
