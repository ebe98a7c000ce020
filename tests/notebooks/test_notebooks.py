"""Executes every notebook under notebooks/ top to bottom (CI runs them; a failing cell fails)."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))




def _check_quickstart(outputs: str) -> None:
  found = re.search(r"relative error of the quantized model: ([0-9.e-]+)", outputs)
  assert found, outputs[-2000:]
  # A 4-bit model is not the float model, and not far from it either.
  assert 1e-4 < float(found.group(1)) < 0.05


def _check_lora(outputs: str) -> None:
  found = re.search(r"LoRA loss ratio: ([0-9.]+)", outputs)
  assert found, outputs[-2000:]
  assert float(found.group(1)) < 0.9  # the LoRA learned the data
  assert "without the LoRA again == base: True" in outputs
  assert "to_q branch rank with the LoRA: 12" in outputs  # rank 8 + the LoRA's 4
  assert "compiled forwards: 2" in outputs  # the base's shapes and the LoRA's, any strength
  zero = re.search(r"strength 0, largest change: ([0-9.e-]+)", outputs)
  assert zero and float(zero.group(1)) < 1e-5, outputs[-2000:]
  half = re.search(r"change at 0.5 / change at 1.0: ([0-9.]+)", outputs)
  assert half and 0.2 < float(half.group(1)) < 0.9, outputs[-2000:]


CHECKS = {"quickstart.ipynb": _check_quickstart, "lora.ipynb": _check_lora}


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ holds no .ipynb"
  assert {p.name for p in NOTEBOOKS} == set(CHECKS)


def test_notebooks_are_what_make_notebooks_writes():
  import sys

  sys.path.insert(0, str(Path(__file__).parents[2] / "notebooks"))
  import make_notebooks

  for name, cells in make_notebooks.NOTEBOOKS.items():
    written = nbformat.read(Path(__file__).parents[2] / "notebooks" / name, as_version=4)
    assert [c.source for c in written.cells] == [text for _, text in cells], name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path):
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parents[1])}})
  client.execute()
  outputs = "".join(output.get("text", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
  CHECKS[path.name](outputs)
