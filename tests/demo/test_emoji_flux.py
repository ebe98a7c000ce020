"""The shipped demo pipeline (demo/emoji_flux): diffusers runs it like ours, and the CLI samples it
with the folder's own settings."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cli.main as cli
import pipelines
from demo import sampling

FOLDER = Path(__file__).resolve().parents[2] / "demo" / "emoji_flux"
PROMPTS = ["red apple", "blue heart"]


def test_folder_is_what_the_package_ships():
  assert (FOLDER / "model_index.json").is_file()
  assert json.loads((FOLDER / "sample_defaults.json").read_text()) == sampling.SAMPLE_DEFAULTS
  assert "CC BY-SA 4.0" in (FOLDER / "MODEL_CARD.md").read_text()
  size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
  assert size <= 25 * 2**20


def test_files_the_model_card_shows_are_in_the_folder():
  """Every figure the card points to (`name.png`) is there, and tracked by git (a .gitignore rule
  once kept them out), unless the card says it is lost."""
  card = (FOLDER / "MODEL_CARD.md").read_text()
  named = set(re.findall(r"`([\w.-]+\.png)`", card))
  lost = {name for name in named if f"`{name}` were not committed" in card}
  assert named - lost >= {"samples.png", "held_out.png", "vae_reconstructions.png"}
  for name in named - lost:
    assert (FOLDER / name).is_file(), name
  tracked = subprocess.run(["git", "ls-files", "--full-name", str(FOLDER)], cwd=FOLDER,
                           capture_output=True, text=True)
  if tracked.returncode == 0 and tracked.stdout:  # a git checkout (not an installed package)
    for name in named - lost:
      assert f"emoji_flux/{name}" in tracked.stdout, f"{name} is not tracked by git"


@pytest.mark.parity
def test_diffusers_flux_pipeline_makes_the_same_image():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  reference = diffusers.FluxPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
  ours = pipelines.load_pipeline(FOLDER)
  settings = dict(sampling.SAMPLE_DEFAULTS, num_inference_steps=6)
  latents = np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32)
  with torch.no_grad():
    expected = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                         **settings).images
  got = ours(PROMPTS, latents=latents, **settings)
  assert got.shape == expected.shape == (2, 32, 32, 3)
  assert np.abs(got - expected).max() <= 2e-3
  assert np.abs(expected - expected[:, :1, :1]).max() > 0.3  # not a flat image


def test_sample_command_uses_the_folder_settings(tmp_path, capsys):
  out = tmp_path / "apple.png"
  assert cli.main(["sample", str(FOLDER), "--prompt", "red apple", "--out", str(out),
                   "--quiet"]) == 0
  from PIL import Image

  image = np.asarray(Image.open(out))
  assert image.shape == (32, 32, 3)
  assert image.std() > 20  # a picture, not a flat colour
