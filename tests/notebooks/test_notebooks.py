"""The notebooks are what notebooks/make_notebooks.py writes, and each has its check and its own
test file (test_run_<name>.py: one file each, so that CI's workers run them side by side)."""

import sys
from pathlib import Path

import nbformat

from tests.notebooks._notebooks import CHECKS, NOTEBOOKS, NOTEBOOKS_DIR


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ holds no .ipynb"
  assert {p.name for p in NOTEBOOKS} == set(CHECKS)
  for path in NOTEBOOKS:
    runner = Path(__file__).parent / f"test_run_{path.stem}.py"
    assert f'run_notebook("{path.name}")' in runner.read_text(), runner


def test_notebooks_are_what_make_notebooks_writes():
  sys.path.insert(0, str(NOTEBOOKS_DIR))
  import make_notebooks

  for name, cells in make_notebooks.NOTEBOOKS.items():
    written = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    assert [c.source for c in written.cells] == [text for _, text in cells], name
