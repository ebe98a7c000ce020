"""Executes every notebook under notebooks/ top to bottom (CI runs them; a failing cell fails)."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path):
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parents[1])}})
  client.execute()
  outputs = "".join(output.get("text", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
  found = re.search(r"relative error of the quantized model: ([0-9.e-]+)", outputs)
  assert found, outputs[-2000:]
  # A 4-bit model is not the float model, and not far from it either.
  assert 1e-4 < float(found.group(1)) < 0.05
