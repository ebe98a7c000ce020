"""`svdq-jax sample --lora FILE[:STRENGTH]` and `svdq-jax train-lora MODEL DATA OUT`: real runs on
a tiny FLUX pipeline, and bad input as one line with exit status 2 (before any model loads where
the check needs no model)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main as cli
from tests.cli.test_main import _configs_only_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.pipelines._pipeline_reference import (  # noqa: E402
  save_peft_lora,
  save_tiny_flux_pipeline,
)

SAMPLE = ["--steps", "2", "--seed", "3", "--height", "32", "--width", "32", "--quiet"]


def _run(argv, capsys) -> tuple[int, str, str]:
  status = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def _bad_input(result, *needles: str) -> None:
  status, _, err = result
  assert status == cli.EXIT_BAD_INPUT, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
  folder = tmp_path_factory.mktemp("cli_lora")
  reference = save_tiny_flux_pipeline(folder / "pipe", heads=4)
  lora, _ = save_peft_lora(reference.transformer, folder / "lora", seed=2)
  return folder / "pipe", lora


def _pixels(path: Path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image, np.int16)


def test_sample_with_loras_writes_them_into_the_png(flux, tmp_path, capsys):
  folder, lora = flux
  base = tmp_path / "base.png"
  status, out, err = _run(["sample", folder, "--prompt", "a red cat", "--out", base, *SAMPLE],
                          capsys)
  assert status == 0, err
  styled = tmp_path / "styled.png"
  status, out, err = _run(["sample", folder, "--prompt", "a red cat", "--out", styled,
                           "--lora", f"{lora}:0.8", "--lora", lora, *SAMPLE], capsys)
  assert status == 0, err
  assert Path(out.strip()) == styled
  with Image.open(styled) as image:
    assert image.text["loras"] == f"{lora}:0.8 {lora}:1"
  assert np.abs(_pixels(styled) - _pixels(base)).max() > 2


def test_bad_lora_files_are_one_line_errors(flux, tmp_path, capsys):
  from safetensors.torch import save_file

  folder, lora = flux
  argv = ["sample", folder, "--prompt", "a red cat", "--out", tmp_path / "x.png", *SAMPLE]
  _bad_input(_run([*argv, "--lora", tmp_path / "none.safetensors"], capsys), "no file")
  _bad_input(_run([*argv, "--lora", f"{lora}:inf"], capsys), "not a finite number")
  other = tmp_path / "sdxl.safetensors"
  save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
            other)
  _bad_input(_run([*argv, "--lora", other], capsys), "match no layer of the flux model",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
  unknown = tmp_path / "unknown.safetensors"
  save_file({"model.weight": torch.zeros(2, 2)}, unknown)
  _bad_input(_run([*argv, "--lora", unknown], capsys), "not a LoRA file of a known format",
             "model.weight")
  assert not (tmp_path / "x.png").exists()


def _data_folder(folder: Path, captions: list[str]) -> Path:
  folder.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i, caption in enumerate(captions):
    pixels = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)  # RGBA, not the training size
    Image.fromarray(pixels, "RGBA").save(folder / f"img{i}.png")
    lines.append(f"img{i}.png\t{caption}")
  (folder / "captions.txt").write_text("# file<TAB>caption\n" + "\n".join(lines) + "\n")
  return folder


def test_train_lora_bad_inputs_fail_before_the_model_loads(flux, tmp_path, capsys, no_model_load):
  folder, _ = flux
  data = _data_folder(tmp_path / "data", ["a red cat", "a blue dog"])
  out = tmp_path / "out"
  _bad_input(_run(["train-lora", folder, tmp_path / "none", out], capsys), "does not exist")
  (tmp_path / "empty").mkdir()
  _bad_input(_run(["train-lora", folder, tmp_path / "empty", out], capsys), "holds no image")
  (data / "captions.txt").write_text("img0.png a red cat\n")
  _bad_input(_run(["train-lora", folder, data, out], capsys), "captions.txt:1",
             "<image file><TAB><caption>")
  (data / "captions.txt").write_text("img0.png\ta red cat\n")
  _bad_input(_run(["train-lora", folder, data, out, "--resolution", "30"], capsys),
             "multiples of 4", "30x30")
  _bad_input(_run(["train-lora", folder, data, out, "--quantize", "int3"], capsys), "int3")
  listing = tmp_path / "data.json"
  listing.write_text(json.dumps([{"image": "data/img0.png"}]))
  _bad_input(_run(["train-lora", folder, listing, out], capsys), "entry 0", "caption")
  pixart = _configs_only_pipeline(tmp_path / "pixart", "PixArtSigmaPipeline", patch_size=2)
  _bad_input(_run(["train-lora", pixart, data, out], capsys), "is a PixArtSigmaPipeline",
             "supports FluxPipeline")
  assert not out.exists()


@pytest.mark.slow
def test_train_lora_then_sample_with_it(flux, tmp_path, capsys):
  """train-lora on a folder of images (RGBA, resized), then sample with the result; the run
  folder has the loss curve and the memory record, and the LoRA moved the image."""
  folder, _ = flux
  data = _data_folder(tmp_path / "data", ["a red cat", "a blue dog", "a green bird"])
  out = tmp_path / "run"
  status, stdout, err = _run(["train-lora", folder, data, out, "--steps", "4", "--rank", "2",
                              "--lr", "0.05", "--resolution", "32", "--max-sequence-length",
                              "16", "--checkpoint-every", "2", "--quiet"], capsys)
  assert status == 0, err
  lora = Path(stdout.strip())
  assert lora == out / "pytorch_lora_weights.safetensors" and lora.is_file()
  assert "memory: peak resident" in err and "MiB" in err
  record = json.loads((out / "train_lora.json").read_text())
  assert record["steps"] == 4 and record["examples"] == 3 and record["peak_rss_bytes"] > 0
  assert (out / "loss.png").is_file()
  base, styled = tmp_path / "base.png", tmp_path / "styled.png"
  for png, extra in ((base, []), (styled, ["--lora", lora])):
    status, _, err = _run(["sample", folder, "--prompt", "a red cat", "--out", png, *SAMPLE,
                           *extra], capsys)
    assert status == 0, err
  assert np.abs(_pixels(styled) - _pixels(base)).max() > 0
