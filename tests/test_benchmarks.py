"""The benchmark scripts start when run the way the README runs them (`python benchmarks/X.py`).

Run as a script, benchmarks/ leads sys.path, so a script named like one of our packages would
shadow it; these tests catch that and any other import-time breakage without running the long
benchmarks. The scripts import the installed packages; here the checkout leads PYTHONPATH
(tests/conftest.py), as an editable install of it would.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, *args], cwd=ROOT / "benchmarks", env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "memory.py"])
def test_script_starts(script: str):
  result = _run(script, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "usage" in result.stdout.lower()


def test_memory_script_meets_the_paper_ratio():
  result = _run("memory.py")
  assert result.returncode == 0, result.stderr[-2000:]
  found = re.search(r"svdquant-int4: [\d.]+ GB -> [\d.]+ GB, ([\d.]+)x smaller", result.stdout)
  assert found, result.stdout[-2000:]
  assert float(found.group(1)) >= 3.5  # SVDQuant paper: 3.5x less memory for the transformer


def test_long_run_compiles_only_for_the_first_prompt():
  result = _run("long_run_memory.py", "--prompts", "3", "--every", "1", "--steps", "2")
  assert result.returncode == 0, result.stderr[-2000:]
  found = re.search(r"compilations: (\d+) during prompt 1, (\d+) during prompts 2-3",
                    result.stdout)
  assert found, result.stdout[-2000:]
  assert int(found.group(1)) > 0 and int(found.group(2)) == 0


@pytest.mark.slow
def test_quantize_cost_runs_both_modes_at_a_small_width():
  """The script end to end at width 128 (one head), a few tokens: every (kind, mode) row, the
  extrapolation table, and the streamed block's quantized bytes below its float weights."""
  result = _run("quantize_cost.py", "--heads", "1", "--runs", "1", "--steps", "1",
                "--image-tokens", "32", "--text-tokens", "8", timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for kind in ("double", "single"):
    for mode in ("whole", "stream"):
      assert any(line.split()[:2] == [kind, mode] for line in lines), (kind, mode, lines)
  table = [line.split() for line in lines if line.split()[:1] in (["whole"], ["stream"])]
  assert len(table) == 2 and all(len(row) == 5 and float(row[3]) > 0 for row in table), table
