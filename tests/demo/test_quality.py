"""demo.quality: input checks, calibration prompts, the measured rows on a tiny random pipeline,
the grid and the atomic report."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from demo import data, quality
from pipelines import plots
from svdq_jax.errors import InputError
from tests.demo._tiny_demo import LABELS, write_tiny_classifier, write_tiny_model

PROMPTS = ["red apple", "fox face", "a prompt the classifier does not know"]


def test_check_presets():
  assert quality.check_presets(["w4a4", "bf16"]) == ("w4a4", "bf16")
  with pytest.raises(InputError, match="unknown preset 'int3'"):
    quality.check_presets(["w4a4", "int3"])
  with pytest.raises(InputError, match="more than once"):
    quality.check_presets(["w4a4", "w4a4"])
  with pytest.raises(InputError, match="no preset"):
    quality.check_presets([])


def test_check_model_missing_or_damaged(tmp_path, monkeypatch):
  monkeypatch.setattr(quality, "DEFAULT_MODEL", tmp_path / "emoji_flux")
  with pytest.raises(InputError, match="packaged demo model .* is missing"):
    quality.check_model(tmp_path / "emoji_flux")
  with pytest.raises(InputError, match="does not exist"):
    quality.check_model(tmp_path / "elsewhere")
  with pytest.raises(InputError, match="model_index.json"):
    quality.check_model(tmp_path)
  (tmp_path / "model_index.json").write_text("{not json")
  with pytest.raises(InputError, match="model_index.json"):
    quality.check_model(tmp_path)


def test_calibration_prompts_are_training_names_only():
  labels = [f"name {i}" for i in range(60)]
  labels[3], labels[40] = data.EVAL_PROMPTS[0], data.EVAL_PROMPTS[1]
  picked = quality.calibration_prompts(labels, 10)
  every = data.HELD_OUT_EVERY
  held_out = {p for i, p in enumerate(labels) if i % every == every // 2}
  assert len(picked) == len(set(picked)) == 10
  assert not set(picked) & (set(data.EVAL_PROMPTS) | held_out)
  assert picked == quality.calibration_prompts(labels, 10)
  assert labels.index(picked[-1]) > 45  # spread over the whole list
  with pytest.raises(InputError, match="training names"):
    quality.calibration_prompts(labels[:5], 10)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  root = tmp_path_factory.mktemp("quality")
  model = write_tiny_model(root / "model")
  judge = quality.Judge.load(write_tiny_classifier(root / "classifier"))
  return quality.measure(model, judge, presets=["bf16", "w4a4"], prompts=PROMPTS, num_steps=2,
                         num_calibration_prompts=4, calibration_steps=2, progress=False)


@pytest.mark.slow  # samples three rows (three compiled loops) and calibrates eagerly
def test_rows_images_and_numbers(measured):
  report = measured
  rows = {r.preset: r for r in report.results}
  assert [r.preset for r in report.results] == [quality.REFERENCE, "bf16", "w4a4"]
  assert [im.shape for im in report.images] == [(3, 32, 32, 3)] * 3
  reference, w4a4 = report.images[0], report.images[2]
  assert not np.array_equal(reference, w4a4)
  # PSNR against the float row's images, by numpy's own arithmetic.
  expected = 10 * np.log10(1 / np.mean((w4a4.astype(np.float64) - reference) ** 2))
  assert rows["w4a4"].psnr == pytest.approx(expected, rel=1e-6)
  assert rows[quality.REFERENCE].psnr is None and rows[quality.REFERENCE].lpips == 0.0
  assert rows["w4a4"].lpips > 0
  # The float model is float32: bf16 kernels take half the bytes, packed 4-bit far less.
  assert rows["w4a4"].bytes < rows["bf16"].bytes < rows[quality.REFERENCE].bytes
  for r in report.results:
    assert r.accuracy in (0.0, 0.5, 1.0)  # two of the three prompts are labels
    assert r.fid is not None and r.fid >= 0 and r.seconds_per_image > 0
  assert report.settings["calibration_prompts"] == quality.calibration_prompts(LABELS, 4)


@pytest.fixture
def report(np_rng):
  """A report of made-up numbers and images (three rows, three prompts)."""
  rows = (quality.PresetResult(quality.REFERENCE, 4000, None, 0.0, 12.5, 1.0, 0.5),
          quality.PresetResult("bf16", 2000, math.inf, 0.0, 12.5, 1.0, 0.5),
          quality.PresetResult("w4a4", 600, 31.5, 0.02, 14.0, 0.5, 0.25))
  images = tuple(np_rng.uniform(size=(3, 32, 32, 3)).astype(np.float32) for _ in rows)
  return quality.QualityReport(tuple(PROMPTS), rows, images, {})


def test_report_files_and_grid(report, tmp_path):
  out = quality.write_report(report, tmp_path / "demo_out")
  results = json.loads((out / "results.json").read_text())
  assert [r["preset"] for r in results] == [quality.REFERENCE, "bf16", "w4a4"]
  for row in results:
    assert tuple(row) == quality.RESULT_KEYS
    assert isinstance(row["bytes"], int) and isinstance(row["seconds_per_image"], float)
    assert all(isinstance(row[k], float) for k in ("lpips", "fid", "accuracy"))
  assert results[0]["psnr"] is None and results[1]["psnr"] is None  # inf: identical images
  assert results[2]["psnr"] == 31.5 and results[2]["bytes"] == 600
  with Image.open(out / "grid.png") as image:
    grid = np.asarray(image.convert("RGB"))
  # One row per preset, one column per prompt: each tile is its image enlarged 3 times.
  assert grid.shape[1] > 3 * 96 and grid.shape[0] > 3 * 96
  tile_h = (grid.shape[0] - 16) // 3
  for r, images in enumerate(report.images):
    for c in range(3):
      top, left = 16 + r * tile_h + 2, 200 + c * 96
      tile = np.repeat(np.repeat(np.round(images[c] * 255).astype(np.uint8), 3, 0), 3, 1)
      np.testing.assert_array_equal(grid[top:top + 96, left:left + 96], tile)


def test_report_failing_midway_keeps_the_old_folder(report, tmp_path, monkeypatch):
  out = tmp_path / "demo_out"
  out.mkdir()
  (out / "results.json").write_text("old")

  def fail(self):
    raise OSError("disk full")

  monkeypatch.setattr(quality.PresetResult, "to_json", fail)
  with pytest.raises(OSError, match="disk full"):
    quality.write_report(report, out)
  assert os.listdir(tmp_path) == ["demo_out"]
  assert os.listdir(out) == ["results.json"] and (out / "results.json").read_text() == "old"


def test_table_has_a_row_per_preset(report):
  lines = quality.format_table(report.results).splitlines()
  assert len(lines) == 2 + 3 and lines[2].startswith("| float | 0.004 | - |")
  assert "| inf |" in lines[3] and "| 31.50 |" in lines[4]


def test_labelled_rows_checks_shapes():
  images = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="captions"):
    plots.labelled_rows([["a"]], [images, images], ["p", "q"])
  with pytest.raises(ValueError, match="labels"):
    plots.labelled_rows([["a"]], [images], ["p"])
