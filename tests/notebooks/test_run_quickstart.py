"""notebooks/quickstart.ipynb runs top to bottom and its outputs pass their check."""

import pytest

from tests.notebooks._notebooks import run_notebook


@pytest.mark.slow
def test_runs():
  run_notebook("quickstart.ipynb")
