"""`svdq-jax convert` and `quantize` killed (SIGKILL) at seeded random points of their run, as
subprocesses on a tiny FLUX pipeline folder: DST is absent, or the previous DST intact, and the
next run succeeds without manual cleanup (it removes what the killed ones left beside DST)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convert import checkpoint
from svdq_jax import is_quantized

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
QUANTIZE_ARGS = ("--steps", "1", "--height", "32", "--width", "32")


def _env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _run(args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)


def _debris(dst: Path) -> list[Path]:
  """The hidden folders `atomic_folder` writes beside dst (temporary or set aside)."""
  return sorted(dst.parent.glob(f".{dst.name}.*"))


def _kill_during(args, dst: Path, delay: float, *, writing_files: bool = False) -> bool:
  """Starts `svdq-jax *args`, waits until it has made its temporary folder beside dst (and, with
  `writing_files`, put something in it) or has ended, then `delay` seconds more, and SIGKILLs it.
  Returns whether it was killed before it finished by itself."""
  before = set(_debris(dst))

  def started() -> bool:
    new = [path for path in _debris(dst) if path.name.endswith(".tmp") and path not in before]
    return any(any(path.iterdir()) for path in new) if writing_files else bool(new)

  proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    while proc.poll() is None and not started():
      time.sleep(0.005)
    time.sleep(delay)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  if not killed:
    assert proc.returncode == 0, stderr.decode()[-2000:]
  return killed


def _contents(folder: Path) -> dict[str, object]:
  """Every file of a pipeline folder: our checkpoints' arrays (a quantized kernel's by field),
  other files' bytes (orbax's own metadata, which holds times and paths, left out)."""
  contents: dict[str, object] = {}
  for path in sorted(folder.rglob("*")):
    relative = str(path.relative_to(folder))
    if (path / "params").is_dir():
      arrays = {}
      for key, value in checkpoint.read_arrays(path).items():
        fields = value.arrays() if is_quantized(value) else {"": value}
        arrays.update({f"{key}:{field}": np.asarray(a) for field, a in fields.items()})
      contents[relative] = arrays
    elif path.is_file() and "/params/" not in f"/{relative}":
      contents[relative] = path.read_bytes()
  return contents


def _assert_same(got: dict, want: dict) -> None:
  assert got.keys() == want.keys()
  for key, value in want.items():
    if isinstance(value, dict):
      assert got[key].keys() == value.keys(), key
      for name, array in value.items():
        np.testing.assert_array_equal(got[key][name], array, err_msg=f"{key}: {name}")
    else:
      assert got[key] == value, key


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  folder = tmp_path_factory.mktemp("killed") / "flux"
  save_tiny_flux_pipeline(folder)
  return folder


@pytest.mark.slow
def test_killed_convert_leaves_no_destination_and_the_next_run_succeeds(tiny_flux, tmp_path):
  rng = random.Random(20)
  dst = tmp_path / "converted"
  reference = _run(["convert", tiny_flux, tmp_path / "reference"])
  assert reference.returncode == 0, reference.stderr[-2000:]
  want = _contents(tmp_path / "reference")
  killed_while_writing = 0
  # Random points after the temporary folder appears, then right after the first file is in it.
  for writing_files, delay in ((False, rng.uniform(0.0, 1.0)), (True, rng.uniform(0.0, 0.3)),
                               (True, 0.0)):
    killed = _kill_during(["convert", tiny_flux, dst], dst, delay, writing_files=writing_files)
    if dst.exists():  # it finished first, or the kill came after the rename (while it was ending)
      _assert_same(_contents(dst), want)  # complete, never a part
      shutil.rmtree(dst)
      continue
    assert killed
    killed_while_writing += bool(_debris(dst))
  assert killed_while_writing  # at least one kill struck mid-write and left a temporary folder
  proc = _run(["convert", tiny_flux, dst])  # the next run cleans up what the killed ones left
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _debris(dst) == []
  _assert_same(_contents(dst), want)


@pytest.mark.slow
def test_killed_quantize_leaves_no_or_the_previous_destination(tiny_flux, tmp_path):
  rng = random.Random(21)
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\n")
  dst = tmp_path / "quantized"
  args = ["quantize", tiny_flux, dst, "--calib", calib, *QUANTIZE_ARGS]
  # During the calibration (the temporary folder exists from the start): no destination.
  assert _kill_during(args, dst, rng.uniform(0.0, 3.0))
  assert not dst.exists() and _debris(dst)
  # While writing: no destination, or, when the kill came after the rename (the process was
  # ending), the complete one.
  assert _kill_during(args, dst, rng.uniform(0.0, 0.5), writing_files=True)
  if dst.exists():
    assert {"transformer", "svdq_quantization.json"} <= {p.name for p in dst.iterdir()}
    shutil.rmtree(dst)
  proc = _run(args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _debris(dst) == []
  previous = _contents(dst)
  assert "transformer" in previous and "svdq_quantization.json" in previous
  # Replacing it (--overwrite), killed while writing: the previous one stays, or (killed between
  # the two renames) is set aside and moved back by the next run's first step.
  _kill_during([*args, "--overwrite"], dst, rng.uniform(0.0, 1.0), writing_files=True)
  checkpoint.clean_stale_siblings(dst)
  assert _debris(dst) == []
  _assert_same(_contents(dst), previous)
