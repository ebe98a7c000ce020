"""End-to-end pipelines: ours against diffusers' FluxPipeline from the same saved folder."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import pipelines  # noqa: E402
import svdq_jax  # noqa: E402
from convert.safetensors_io import CheckpointError  # noqa: E402
from models.tokenizers import Tokenizer, TokenizerError  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from tests.pipelines._pipeline_reference import (  # noqa: E402  (needs torch, checked above)
  HEIGHT,
  MAX_SEQUENCE_LENGTH,
  WIDTH,
  save_tiny_flux_pipeline,
  save_tiny_pixart_pipeline,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a red cat", "a big old house by the river at night with a tree"]


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def tiny(request, tmp_path_factory):
  """(folder, diffusers pipeline, our pipeline) for a dev-like or schnell-like tiny FLUX."""
  folder = tmp_path_factory.mktemp("flux_dev" if request.param else "flux_schnell")
  reference = save_tiny_flux_pipeline(folder, guidance_embeds=request.param)
  return folder, reference, pipelines.FluxPipeline.from_pretrained(folder)


def _initial_latents(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, 64, 16)).astype(np.float32)


@pytest.mark.parity
def test_flux_pipeline_matches_diffusers(tiny):
  _, reference, ours = tiny
  latents = _initial_latents()
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
  with torch.no_grad():
    expected = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                         **kwargs).images
  got = ours(PROMPTS, latents=latents, **kwargs)
  assert got.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
  assert np.abs(got - expected).max() <= 1e-3
  assert np.abs(expected - expected[:, :1, :1]).max() > 0.05  # the images are not flat


@pytest.mark.parity
@pytest.mark.parametrize("tiny", [False], indirect=True, ids=["schnell"])
def test_flux_true_cfg_matches_diffusers(tiny):
  """diffusers' `true_cfg_scale` with a negative prompt: v_neg + s (v - v_neg) per step."""
  _, reference, ours = tiny
  latents = _initial_latents(1)
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
  negative = ["", "a small dog"]
  with torch.no_grad():
    expected = reference(PROMPTS, negative_prompt=negative, true_cfg_scale=4.0,
                         latents=torch.from_numpy(latents), output_type="np", **kwargs).images
  got = ours(PROMPTS, negative_prompt=negative, true_cfg_scale=4.0, latents=latents, **kwargs)
  assert np.abs(got - expected).max() <= 1e-3
  plain = ours(PROMPTS, latents=latents, **kwargs)
  assert np.abs(plain - got).max() > 1e-2  # the guidance changed the images
  ignored = ours(PROMPTS, negative_prompt="", true_cfg_scale=1.0, latents=latents, **kwargs)
  np.testing.assert_array_equal(ignored, plain)  # as diffusers: no CFG at scale 1


@pytest.mark.parity
def test_pixart_pipeline_with_guidance_matches_diffusers(tmp_path):
  """Classifier-free guidance with a negative prompt, DPM-Solver++ 2M, learned-sigma split."""
  reference = save_tiny_pixart_pipeline(tmp_path)
  ours = pipelines.load_pipeline(tmp_path)
  assert isinstance(ours, pipelines.PixArtSigmaPipeline)
  latents = np.random.default_rng(3).standard_normal((2, 4, 16, 16)).astype(np.float32)
  kwargs = dict(negative_prompt="a blue dog", height=HEIGHT, width=WIDTH, num_inference_steps=4,
                guidance_scale=4.5, max_sequence_length=MAX_SEQUENCE_LENGTH)
  with torch.no_grad():
    expected = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                         use_resolution_binning=False, clean_caption=False, **kwargs).images
  got = ours(PROMPTS, latents=latents, **kwargs)
  assert got.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
  assert np.abs(got - expected).max() <= 1e-3
  unguided = ours(PROMPTS, latents=latents, **{**kwargs, "guidance_scale": 1.0})
  assert np.abs(unguided - got).max() > 1e-3  # guidance changed the image


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_same_seed_same_image_bit_for_bit(tiny):
  _, _, ours = tiny
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
  first = ours(PROMPTS[:1], seed=7, num_images_per_prompt=2, **kwargs)
  again = ours(PROMPTS[:1], seed=7, num_images_per_prompt=2, progress=True, **kwargs)
  other = ours(PROMPTS[:1], seed=8, num_images_per_prompt=2, **kwargs)
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3
  assert np.abs(first[0] - first[1]).max() > 1e-3  # two images of one prompt differ


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_bfloat16_pipeline_stays_close_to_float32(tiny):
  import jax.numpy as jnp

  folder, _, ours = tiny
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, seed=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
  bf16 = pipelines.load_pipeline(folder, dtype=jnp.bfloat16)
  assert bf16.transformer.x_embedder.kernel.get_value().dtype == jnp.bfloat16
  got, expected = bf16(PROMPTS[:1], **kwargs), ours(PROMPTS[:1], **kwargs)
  assert got.dtype == np.float32
  assert np.abs(got - expected).max() <= 0.1  # measured 0.03: bf16 weights and activations


def test_tokenizers_match_transformers(tiny):
  folder, reference, ours = tiny
  texts = PROMPTS + ["", "  A  Photo\tOF snow  ", "unknownword zebra 42!"]
  for mine, theirs, length in ((ours.tokenizer, reference.tokenizer, 12),
                               (ours.tokenizer_2, reference.tokenizer_2, MAX_SEQUENCE_LENGTH)):
    expected = theirs(texts, padding="max_length", max_length=length, truncation=True)
    got = mine(texts, length)
    np.testing.assert_array_equal(got.input_ids, np.asarray(expected.input_ids))
    np.testing.assert_array_equal(got.attention_mask, np.asarray(expected.attention_mask))


def test_clip_tokenizer_from_vocab_and_merges(tiny, tmp_path):
  """A CLIP folder with only vocab.json + merges.txt (as FLUX.1 ships) tokenizes the same."""
  folder, reference, _ = tiny
  model = json.loads(reference.tokenizer.backend_tokenizer.to_str())["model"]
  (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
  merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (tmp_path / "tokenizer_config.json").write_text(
      (folder / "tokenizer" / "tokenizer_config.json").read_text())
  texts = PROMPTS + ["Snow, snow!  dog's hat"]
  expected = reference.tokenizer(texts, padding="max_length", max_length=12, truncation=True)
  got = Tokenizer.from_pretrained(tmp_path)(texts, 12)
  np.testing.assert_array_equal(got.input_ids, np.asarray(expected.input_ids))


def test_tokenizer_folder_errors(tmp_path):
  with pytest.raises(TokenizerError, match="does not exist"):
    Tokenizer.from_pretrained(tmp_path / "missing")
  (tmp_path / "spiece.model").write_bytes(b"\x00")
  with pytest.raises(TokenizerError, match="save_pretrained"):
    Tokenizer.from_pretrained(tmp_path)
  import tokenizers

  no_config = tmp_path / "no_config"
  no_config.mkdir()
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, "<unk>"))
  backend.save(str(no_config / "tokenizer.json"))
  with pytest.raises(TokenizerError, match="tokenizer_config.json: no pad_token"):
    Tokenizer.from_pretrained(no_config)


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_pipeline_folder_errors(tmp_path, tiny):
  with pytest.raises(CheckpointError, match="does not exist"):
    pipelines.load_pipeline(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="no model_index.json"):
    pipelines.load_pipeline(tmp_path)
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePipeline"}))
  with pytest.raises(CheckpointError, match="not supported"):
    pipelines.load_pipeline(tmp_path)
  folder, _, ours = tiny
  copy = tmp_path / "copy"
  (copy / "scheduler").mkdir(parents=True)
  (copy / "model_index.json").write_text((folder / "model_index.json").read_text())
  scheduler_config = copy / "scheduler" / "scheduler_config.json"
  scheduler_config.write_text("{not json")
  with pytest.raises(CheckpointError, match="scheduler_config.json: cannot parse"):
    pipelines.load_pipeline(copy)
  scheduler_config.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
  with pytest.raises(CheckpointError, match="scheduler_config.json: scheduler 'DDIMScheduler'"):
    pipelines.load_pipeline(copy)


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_bad_call_arguments_are_input_errors(tiny):
  _, _, ours = tiny
  kwargs = dict(height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQUENCE_LENGTH)
  with pytest.raises(InputError, match="FluxPipeline: negative_prompt must be a string or a list "
                     "of 2 strings"):
    ours(PROMPTS, negative_prompt=["a", "b", "c"], true_cfg_scale=2.0, **kwargs)
  for prompt in ([], ["a cat", 3]):
    with pytest.raises(InputError, match=re.escape(f"non-empty list of strings, got {prompt!r}")):
      ours(prompt, **kwargs)
  with pytest.raises(InputError, match="FluxPipeline: height and width must be positive multiples "
                     "of 4, got 30x32"):
    ours(PROMPTS, height=30, width=WIDTH)
  with pytest.raises(InputError, match=re.escape("FluxPipeline: latents must be (2, 64, 16), got "
                                                 "(2, 63, 16)")):
    ours(PROMPTS, latents=np.zeros((2, 63, 16), np.float32), **kwargs)
  for count in (0, -1, 1.5, True):
    with pytest.raises(InputError, match=re.escape(
        f"FluxPipeline: num_images_per_prompt must be an integer >= 1, got {count!r}")):
      ours(PROMPTS, num_images_per_prompt=count, **kwargs)
  with pytest.raises(InputError, match="FluxPipeline: output_type must be 'np' or 'latent', got "
                     "'pil'"):
    ours(PROMPTS, output_type="pil", **kwargs)


def test_check_image_size():
  pipelines.check_image_size("here", 48, 32, 16)
  for height, width in ((40, 32), (48, 8), (0, 32), (-16, 32)):
    with pytest.raises(InputError, match=re.escape(f"here: height and width must be positive "
                                                   f"multiples of 16, got {height}x{width}")):
      pipelines.check_image_size("here", height, width, 16)


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_image_size_multiple_from_configs_is_diffusers_rule(tiny, tmp_path, monkeypatch):
  """FLUX: diffusers' FluxPipeline wants multiples of its vae_scale_factor * 2; PixArt: the
  VAE's factor times the transformer's patch size, both as diffusers reads them. Only config
  files are read: loading a model fails here."""
  folder, flux_reference, ours = tiny
  pixart_reference = save_tiny_pixart_pipeline(tmp_path / "pixart")

  def load(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(pipelines.FluxPipeline, "from_pretrained", load)
  monkeypatch.setattr(pipelines.PixArtSigmaPipeline, "from_pretrained", load)
  assert pipelines.image_size_multiple(folder) == flux_reference.vae_scale_factor * 2
  assert ours.size_multiple(ours.vae.config, ours.transformer.config) == (
      flux_reference.vae_scale_factor * 2)
  assert pipelines.image_size_multiple(tmp_path / "pixart") == (
      pixart_reference.vae_scale_factor * pixart_reference.transformer.config.patch_size)


def test_model_index_and_pipeline_name(tmp_path):
  index = tmp_path / "model_index.json"
  with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'missing'}: pipeline folder does "
                                                 "not exist")):
    pipelines.read_model_index(tmp_path / "missing")
  with pytest.raises(InputError, match=re.escape(f"{tmp_path}: no model_index.json (not a "
                                                 "diffusers pipeline folder)")):
    pipelines.read_model_index(tmp_path)
  index.write_text("[]")
  with pytest.raises(InputError, match=re.escape(f"{index}: not a JSON object")):
    pipelines.read_model_index(tmp_path)
  index.write_text(json.dumps({"_class_name": "StableCascadePipeline", "vae": ["diffusers", "X"]}))
  assert pipelines.read_model_index(tmp_path) == {"_class_name": "StableCascadePipeline",
                                                  "vae": ["diffusers", "X"]}
  with pytest.raises(InputError, match=re.escape(f"{tmp_path}: pipeline 'StableCascadePipeline' "
                                                 "is not supported (supported: ['FluxPipeline', "
                                                 "'PixArtSigmaPipeline', "
                                                 "'StableDiffusionXLPipeline'])")):
    pipelines.pipeline_name(tmp_path)
  index.write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
  assert pipelines.pipeline_name(tmp_path) == "PixArtSigmaPipeline"


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_quantize_pipeline_checks_its_arguments_before_loading(tiny, tmp_path, no_model_load):
  """A bad size, prompt list or destination fails in milliseconds, not after a model loaded."""
  folder, _, _ = tiny
  with pytest.raises(InputError, match=re.escape(f"quantize_pipeline {str(folder)!r}: height and "
                                                 "width must be positive multiples of 4, got "
                                                 "30x32")):
    pipelines.quantize_pipeline(folder, tmp_path / "q", preset="w4a4", prompts=PROMPTS,
                                height=30, width=32)
  with pytest.raises(InputError, match="non-empty list of strings, got \\[\\]"):
    pipelines.quantize_pipeline(folder, tmp_path / "q", preset="w4a4", prompts=[])
  with pytest.raises(InputError, match="Nunchaku layout needs a FluxPipeline and one of the "
                     "presets .* with 'nf4-w4a16'"):
    pipelines.quantize_pipeline(folder, tmp_path / "q", preset="nf4-w4a16", prompts=PROMPTS,
                                height=32, width=32, nunchaku_layout=True)
  (tmp_path / "done").mkdir()
  with pytest.raises(InputError, match="already exists"):
    pipelines.quantize_pipeline(folder, tmp_path / "done", preset="w4a4", prompts=PROMPTS,
                                height=32, width=32)
  assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_quantize_denoiser_takes_one_string_as_one_prompt(tiny, monkeypatch):
  _, _, ours = tiny
  calibrated = []

  def calibrate(run, prompts, **kwargs):
    calibrated.extend(prompts)
    raise InterruptedError("stop after calibration was reached")

  monkeypatch.setattr(svdq_jax, "calibrate", calibrate)
  with pytest.raises(InterruptedError):
    pipelines.quantize_denoiser(ours, None, "a red cat")
  assert calibrated == ["a red cat"]


def test_quantize_denoiser_samples_with_the_guidance_it_is_given(monkeypatch):
  """The calibration runs get `guidance_scale` (SDXL-Turbo calibrates at 0, as it samples)."""
  calls = []

  class Pipe:
    denoiser = None

    def __call__(self, prompt, **kwargs):
      calls.append((prompt, kwargs["guidance_scale"], kwargs["jit"]))

  def calibrate(run, prompts, **kwargs):
    for prompt in prompts:
      run(prompt)
    raise InterruptedError("stop after calibration")

  monkeypatch.setattr(svdq_jax, "calibrate", calibrate)
  for guidance in (0.0, None):
    with pytest.raises(InterruptedError):
      pipelines.quantize_denoiser(Pipe(), None, ["a", "b"], guidance_scale=guidance)
  assert calls == [("a", 0.0, False), ("b", 0.0, False), ("a", None, False), ("b", None, False)]


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_calibrate_denoiser_runs_prompts_in_batches(tiny, monkeypatch):
  _, _, ours = tiny
  calibrated = []

  def calibrate(run, inputs, **kwargs):
    calibrated.extend(inputs)
    raise InterruptedError("stop after calibration was reached")

  monkeypatch.setattr(svdq_jax, "calibrate", calibrate)
  with pytest.raises(InterruptedError):
    pipelines.calibrate_denoiser(ours, ["a", "b", "c"], batch_size=2)
  assert calibrated == [["a", "b"], ["c"]]
  with pytest.raises(InputError, match="batch_size"):
    pipelines.calibrate_denoiser(ours, ["a"], batch_size=0)


@pytest.mark.parametrize("tiny", [True], indirect=True, ids=["dev"])
def test_with_transformer_shares_everything_else(tiny):
  from flax import nnx

  _, _, ours = tiny
  copy = nnx.clone(ours.transformer)
  pipe = ours.with_transformer(copy)
  assert pipe.transformer is copy and ours.transformer is not copy
  assert pipe.vae is ours.vae and pipe._t5 is ours._t5 and pipe._decode is ours._decode
  assert pipe._runners == {} and pipe._runners is not ours._runners
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
  np.testing.assert_array_equal(pipe(PROMPTS[0], **kwargs), ours(PROMPTS[0], **kwargs))


def test_png_metadata_holds_prompt_and_seed(tmp_path):
  from PIL import Image

  images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  paths = pipelines.save_images(images, tmp_path / "out.png", prompts=["first", "second"],
                                seed=42, extra={"steps": "4"})
  assert [p.name for p in paths] == ["out_0.png", "out_1.png"]
  with Image.open(paths[1]) as image:
    assert image.text["prompt"] == "second" and image.text["seed"] == "42"
    assert image.text["steps"] == "4"
    np.testing.assert_array_equal(np.asarray(image),
                                  np.round(images[1] * 255).astype(np.uint8))


EIGHT_DEVICES = textwrap.dedent("""
  import sys
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import numpy as np
  import pipelines
  folder, out = sys.argv[1], sys.argv[2]
  pipe = pipelines.FluxPipeline.from_pretrained(folder)
  prompts = [f"a {c} {a} in snow" for c in ("red", "blue", "green", "old")
             for a in ("cat", "dog")]
  kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, seed=5)
  np.save(out + "/eight.npy", pipe(prompts, devices=8, **kw))
  np.save(out + "/one.npy", pipe(prompts, devices=1, **kw))
  np.save(out + "/eight_progress.npy", pipe(prompts, devices=8, progress=True, **kw))
""")


@pytest.mark.slow
def test_eight_prompts_on_eight_devices_equal_one_device(tmp_path):
  folder = tmp_path / "flux"
  save_tiny_flux_pipeline(folder)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(folder), str(tmp_path)],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight, one = np.load(tmp_path / "eight.npy"), np.load(tmp_path / "one.npy")
  assert eight.shape == (8, HEIGHT, WIDTH, 3)
  # One image per device against eight on one device: XLA's CPU matmuls block differently for
  # batch 1 and batch 8, so float32 rounding may differ in the last bits (seen: 1.1e-6).
  np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)
  # The per-step body (progress bar) on 8 devices gives the same images as the fused loop.
  np.testing.assert_allclose(np.load(tmp_path / "eight_progress.npy"), eight, rtol=0, atol=1e-5)
