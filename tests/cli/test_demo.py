"""`svdq-jax demo` on a tiny random pipeline: the files it writes, the atomic replacement of OUT,
and one line with exit status 2 (and nothing written) for each kind of bad input."""

import json
import os

import pytest

import pipelines
from cli import main as cli
from demo import quality
from tests.demo._tiny_demo import write_tiny_classifier, write_tiny_model

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo_inputs")
  prompts = root / "prompts.txt"
  prompts.write_text("# two labels of the tiny classifier\nred apple\nfox face\n")
  return write_tiny_model(root / "model"), write_tiny_classifier(root / "classifier"), prompts


def _demo(folders, out, *extra):
  model, classifier, prompts = folders
  return ["demo", "--model", str(model), "--classifier", str(classifier), "--prompts",
          str(prompts), "--out", str(out), *FAST, *extra]


def _assert_one_line(status, err, code, *needles):
  assert status == code
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("svdq-jax demo: error:"), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.slow  # two sampled rows and an eager calibration
def test_demo_writes_grid_and_results_and_replaces_out(folders, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(quality, "NUM_CALIBRATION_PROMPTS", 4)
  out = tmp_path / "demo_out"
  out.mkdir()
  (out / "stale.txt").write_text("from an earlier run")
  assert cli.main(_demo(folders, out, "--presets", "w4a4")) == 0
  printed = capsys.readouterr().out
  assert "| float |" in printed and "| w4a4 |" in printed
  assert sorted(os.listdir(out)) == ["grid.png", "results.json"]
  assert os.listdir(tmp_path) == ["demo_out"]
  results = json.loads((out / "results.json").read_text())
  assert [r["preset"] for r in results] == ["float", "w4a4"]
  assert all(tuple(r) == quality.RESULT_KEYS for r in results)
  assert all(isinstance(r["bytes"], int) and isinstance(r["lpips"], float) for r in results)
  assert results[0]["psnr"] is None and isinstance(results[1]["psnr"], float)
  assert results[1]["bytes"] < results[0]["bytes"]


@pytest.mark.slow  # calibrates and samples the float row before the preset fails
def test_a_failing_preset_leaves_the_old_out(folders, tmp_path, capsys, monkeypatch):
  """A preset whose sampling overflows (NonFiniteError): exit status 3, OUT as it was."""
  monkeypatch.setattr(quality, "NUM_CALIBRATION_PROMPTS", 4)
  out = tmp_path / "demo_out"
  out.mkdir()
  (out / "results.json").write_text("old")

  def overflow(*args, **kwargs):
    raise pipelines.NonFiniteError("the transformer made the latents NaN or inf")

  monkeypatch.setattr(quality.svdq_jax, "quantize_model", overflow)
  status = cli.main(_demo(folders, out, "--presets", "w4a4"))
  _assert_one_line(status, capsys.readouterr().err, cli.EXIT_NON_FINITE, "NaN or inf")
  assert os.listdir(tmp_path) == ["demo_out"]
  assert os.listdir(out) == ["results.json"] and (out / "results.json").read_text() == "old"


def _refuses(argv, tmp_path, capsys, *needles):
  status = cli.main(argv)
  _assert_one_line(status, capsys.readouterr().err, cli.EXIT_BAD_INPUT, *needles)
  assert not (tmp_path / "demo_out").exists()


def test_missing_packaged_model(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(quality, "DEFAULT_MODEL", tmp_path / "emoji_flux")
  _refuses(["demo", "--out", str(tmp_path / "demo_out")], tmp_path, capsys,
           "packaged demo model", "missing", "--model")


def test_bad_model_folders(folders, tmp_path, capsys):
  _, classifier, _ = folders
  out = ["--out", str(tmp_path / "demo_out"), "--classifier", str(classifier)]
  _refuses(["demo", "--model", str(tmp_path / "nope"), *out], tmp_path, capsys, "does not exist")
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  _refuses(["demo", "--model", str(damaged), *out], tmp_path, capsys, "model_index.json")
  (damaged / "model_index.json").write_text("[1, 2")
  _refuses(["demo", "--model", str(damaged), *out], tmp_path, capsys, "model_index.json")


def test_truncated_weights_are_bad_input(folders, tmp_path, capsys):
  model, classifier, prompts = folders
  broken = tmp_path / "broken"
  broken.mkdir()
  for entry in model.iterdir():
    target = broken / entry.name
    if entry.is_dir():
      target.mkdir()
      for file in entry.iterdir():
        data = file.read_bytes()
        target.joinpath(file.name).write_bytes(
            data[:len(data) // 2] if file.suffix == ".safetensors" and entry.name == "vae"
            else data)
    else:
      target.write_bytes(entry.read_bytes())
  _refuses(_demo((broken, classifier, prompts), tmp_path / "demo_out", "--presets", "w4a4"),
           tmp_path, capsys, "vae")


def test_bad_presets_prompts_and_classifier(folders, tmp_path, capsys):
  model, classifier, prompts = folders
  out = tmp_path / "demo_out"
  _refuses(_demo(folders, out, "--presets", "w4a4,int3"), tmp_path, capsys,
           "unknown preset 'int3'")
  _refuses(_demo(folders, out, "--presets", ","), tmp_path, capsys, "no preset")
  binary = tmp_path / "prompts.bin"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
  _refuses(_demo((model, classifier, binary), out), tmp_path, capsys, "prompts.bin",
           "not UTF-8")
  _refuses(_demo((model, classifier, tmp_path / "none.txt"), out), tmp_path, capsys,
           "does not exist")
  _refuses(_demo((model, tmp_path / "no_classifier", prompts), out), tmp_path, capsys,
           "not a demo classifier")
  assert sorted(os.listdir(tmp_path)) == ["prompts.bin"]


def test_help_names_the_options(capsys):
  with pytest.raises(SystemExit):
    cli.main(["demo", "--help"])
  text = capsys.readouterr().out
  for option in ("--model", "--classifier", "--out", "--presets", "--prompts", "--steps"):
    assert option in text
