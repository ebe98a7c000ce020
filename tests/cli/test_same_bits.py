"""Same prompt, seed and settings: `svdq-jax sample` writes the same PNG, byte for byte, from two
processes (with different hash seeds and working folders). What does change the bits is listed in
the README ("Reproducibility")."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sample_writes_identical_png_bytes_in_two_processes(tmp_path):
  from PIL import Image

  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  folder = tmp_path / "flux"
  save_tiny_flux_pipeline(folder)
  written = []
  for run, hash_seed in enumerate(("1", "2")):
    workdir = tmp_path / f"run{run}"
    workdir.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "sample", str(folder), "--prompt", "a red cat on a mat",
         "--steps", "2", "--seed", "5", "--height", "32", "--width", "32", "--out",
         str(workdir / "cat.png"), "--quiet"],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    paths = [Path(p) for p in proc.stdout.split()]
    assert len(paths) == 1
    written.append(paths[0].read_bytes())
  assert written[0] == written[1]
  with Image.open(tmp_path / "run0" / paths[0].name) as image:
    pixels = np.asarray(image)
  assert pixels.shape == (32, 32, 3) and pixels.std() > 1.0  # an image, not a blank
