"""benchmarks/kernels.py runs end to end (interpreted on CPU) and refuses to invent GPU figures;
benchmarks/gpu_session.sh runs its parts in order, each to its own file, whatever one does."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

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


@pytest.mark.slow
def test_interpret_sweep_checks_and_ranks_each_config(bench, tmp_path, capsys):
  output = tmp_path / "sweep.txt"
  assert bench.main(["--sweep", "--interpret", "--output", str(output)]) == 0
  lines = output.read_text().splitlines()
  assert capsys.readouterr().out.splitlines() == lines
  rows = [line.split("|") for line in lines if line.startswith("   64    256    128")]
  baseline, configs = rows[0], rows[1:]
  assert baseline[1].strip() == "XLA bf16 dot" and float(baseline[3]) > 0
  assert len(configs) == 2 and {row[1].split()[-1] for row in configs} == {"auto", "manual"}
  for row in configs:
    us, ratio, rel_err, *marks = row[3].split()
    assert float(rel_err) <= bench.REL_TOL and "WRONG" not in marks
    assert float(ratio.rstrip("x")) == pytest.approx(float(baseline[3]) / float(us), abs=0.01)
  fastest = min(configs, key=lambda row: float(row[3].split()[0]))
  assert [row[3].split()[-1] == "*" for row in configs] == [row is fastest for row in configs]


@pytest.mark.slow
def test_a_config_that_fails_is_listed_and_the_sweep_goes_on(bench, tmp_path, capsys, monkeypatch):
  """A config whose kernel fails to compile or run is a FAILED row with its error; the sweep
  still writes its table, with the other configs measured, and exits 1."""
  check = bench.check_against_reference

  def failing_for_manual_barriers(layer, interpret, config=None, want=None):
    if config is not None and config.gemm.manual_barriers:
      raise RuntimeError("Mosaic GPU compilation failed\ndetails")
    return check(layer, interpret, config, want)

  monkeypatch.setattr(bench, "check_against_reference", failing_for_manual_barriers)
  output = tmp_path / "sweep.txt"
  assert bench.main(["--sweep", "--interpret", "--output", str(output)]) == 1
  rows = [line.split("|") for line in output.read_text().splitlines()
          if line.startswith("   64    256    128")]
  assert [row[1].split()[-1] for row in rows[1:]] == ["auto", "manual"]
  assert rows[1][3].split()[-1] == "*" and "WRONG" not in rows[1][3]
  assert rows[2][3].strip() == "FAILED: RuntimeError: Mosaic GPU compilation failed"
  capsys.readouterr()


def test_sweep_covers_every_varied_field_once(bench):
  base = bench.select_config(4096, 3072, 12288, bench.RANK).gemm
  configs = bench.sweep_configs(base)
  assert configs[0] == base and len(set(configs)) == len(configs)
  assert {c.block_n for c in configs} == {64, 128, 256}
  assert {c.groups_per_step for c in configs} == {1, 2, 4}
  assert {c.carrier for c in configs} == {"s8", "e4m3"}
  assert {c.magic_int_to_float for c in configs} == {True, False}
  assert {c.max_concurrent_steps for c in configs} == {2, 3, 4}
  assert {c.manual_barriers for c in configs} == {True, False}


SESSION = SCRIPT.parent / "gpu_session.sh"


def _run_session(tmp_path, *args, python=None, total_seconds=None):
  env = {**os.environ, "OUT": str(tmp_path / "out")}
  if python:
    env["PYTHON"] = python
  if total_seconds:
    env["TOTAL_SECONDS"] = str(total_seconds)
  return subprocess.run(["bash", str(SESSION), *args], env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def _results_dir(stdout):
  first = stdout.splitlines()[0]
  assert first.startswith("# gpu_session:")
  return pathlib.Path(first.split("results in ")[1])


def test_gpu_session_dry_run_lists_every_part_without_running_it(tmp_path):
  run = _run_session(tmp_path, "--dry-run")
  assert run.returncode == 0, run.stderr
  results = _results_dir(run.stdout)
  assert results.parent == tmp_path / "out" / "results"
  parts = {line.split()[1]: line for line in run.stdout.splitlines() if line.startswith("## ")}
  assert list(parts) == ["tests", "kernels", "sweep", "sampling"]
  assert "-m pytest -q -p no:xdist tests/pallas_kernels >" in parts["tests"]
  assert "benchmarks/kernels.py --iters" in parts["kernels"]
  assert "benchmarks/kernels.py --sweep" in parts["sweep"]
  assert "benchmarks/sampling.py --shapes flux-dev" in parts["sampling"]
  for name, line in parts.items():
    assert line.endswith(f"> {results / name}.txt") and "--interpret" not in line
  # The fixed limits leave the last part at least a minute of the 9-minute budget.
  fixed = sum(int(re.search(r"\(limit (\d+) s\)", parts[name])[1])
              for name in ("tests", "kernels", "sweep"))
  assert fixed + 60 <= 530
  assert "the rest of 530 s, at least 90 s" in parts["sampling"]
  assert not (tmp_path / "out").exists()
  alone = _run_session(tmp_path, "--dry-run", "sweep")
  [sweep] = [line for line in alone.stdout.splitlines() if line.startswith("## ")]
  assert "(limit: the rest of 530 s, at least 530 s)" in sweep


def test_gpu_session_goes_on_after_a_failed_part_and_reports_it(tmp_path):
  """With a stand-in python: the sweep exits 3 and sampling outlives its limit; every part still
  runs, writes its output, and the summary and exit status say which failed."""
  stub = tmp_path / "python"
  stub.write_text('#!/bin/sh\ncase "$*" in\n  *--sweep*) echo "sweep broke"; exit 3 ;;\n'
                  '  *sampling*) echo "sampling started"; exec sleep 60 ;;\n'
                  '  *) echo "ran $*" ;;\nesac\n')
  stub.chmod(0o755)
  run = _run_session(tmp_path, python=str(stub), total_seconds=2)
  assert run.returncode == 1, run.stderr
  results = _results_dir(run.stdout)
  summary = (results / "summary.txt").read_text().splitlines()
  assert summary[1:] == ["tests: ok", "kernels: ok", "sweep: FAILED: exit status 3",
                         summary[4]]
  assert summary[4].startswith("sampling: FAILED")
  assert run.stdout.rstrip().endswith("\n".join(summary))
  tests_output = (results / "tests.txt").read_text()
  assert tests_output == "ran -m pytest -q -p no:xdist tests/pallas_kernels\n"
  assert (results / "sweep.txt").read_text() == "sweep broke\n"
  assert (results / "sampling.txt").read_text() == "sampling started\n"


def test_gpu_session_tests_the_gpu_and_keeps_what_a_stopped_part_printed(tmp_path):
  """tests/conftest.py defaults JAX_PLATFORMS to cpu, where the kernel tests would run interpreted:
  the session must name the GPU first. And a real Python stopped by a part's time limit must leave
  what it printed before (Python holds a pipe's output back and a SIGTERM loses it)."""
  stub = tmp_path / "python"
  sleeper = "import time; print('sampling started'); time.sleep(60)"
  stub.write_text(f'#!/bin/sh\ncase "$*" in\n  *pytest*) echo "$JAX_PLATFORMS" ;;\n'
                  f'  *sampling*) exec {sys.executable} -c "{sleeper}" ;;\nesac\n')
  stub.chmod(0o755)
  run = _run_session(tmp_path, "tests", "sampling", python=str(stub), total_seconds=3)
  results = _results_dir(run.stdout)
  assert (results / "tests.txt").read_text().split(",")[0] == "cuda"
  assert (results / "summary.txt").read_text().splitlines()[2].startswith("sampling: FAILED: timed")
  assert (results / "sampling.txt").read_text() == "sampling started\n"
