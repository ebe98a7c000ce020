"""benchmarks/kernels.py runs end to end (interpreted on CPU) and refuses to invent GPU figures."""

import importlib.util
import pathlib

import pytest

from pallas_kernels.svdq_linear import is_supported

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_interpret_smoke_run_writes_a_checked_row(bench, tmp_path, capsys):
  output = tmp_path / "kernels.txt"
  assert bench.main(["--interpret", "--output", str(output)]) == 0
  lines = output.read_text().splitlines()
  assert capsys.readouterr().out.splitlines() == lines
  header, row = lines[-2], lines[-1].split()
  assert header.split()[:3] == ["M", "K", "N"] and "rel.err" in header
  assert row[:3] == ["64", "128", "128"] and "WRONG" not in row
  assert float(row[-1]) <= bench.REL_TOL


@pytest.mark.skipif(is_supported(), reason="a Hopper GPU runs the real benchmark")
def test_without_a_hopper_gpu_it_says_so_and_measures_nothing(bench, capsys):
  assert bench.main(["--tokens", "64"]) == 0
  out = capsys.readouterr().out
  assert "No figures measured" in out and "|" not in out
