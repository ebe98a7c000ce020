"""StableDiffusionXLPipeline against diffusers' from the same saved tiny folder: classifier-free
guidance with negative prompts and micro-conditioning, zeroed negatives, SDXL-Turbo's settings
(Euler ancestral and trailing Euler, no guidance); seeds, data parallelism, NaN detection,
conversion, and calibration and quantization through the UNet."""

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
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import pipelines  # noqa: E402
from convert.safetensors_io import CheckpointError  # noqa: E402
from models import schedulers  # noqa: E402
from pipelines.sdxl import StableDiffusionXLPipeline  # noqa: E402
from svdq_jax import QuantConfig, calibrate, is_quantized, quantize_model  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from tests.pipelines._pipeline_reference import (  # noqa: E402  (needs torch, checked above)
  HEIGHT,
  SDXL_TURBO_SCHEDULER,
  WIDTH,
  save_tiny_sdxl_pipeline,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a red cat", "a big old house by the river at night with a tree"]
LATENT_SHAPE = (2, 4, HEIGHT // 2, WIDTH // 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder, diffusers pipeline, our pipeline): SDXL-like, Euler with SDXL's settings."""
  folder = tmp_path_factory.mktemp("sdxl")
  reference = save_tiny_sdxl_pipeline(folder)
  return folder, reference, StableDiffusionXLPipeline.from_pretrained(folder)


def _latents(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(LATENT_SHAPE).astype(np.float32)


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parity
@pytest.mark.parametrize("negative", ["prompts", "zeros"])
def test_guided_pipeline_matches_diffusers(tiny, negative):
  """CFG 5 over 3 Euler steps with micro-conditioning: a negative prompt with its own
  micro-conditioning, or two prompts without a negative one (force_zeros_for_empty_prompt: zero
  negative features). Final latents within 1e-4 relative, images within 1e-3.

  One prompt in the first case: for a batch above one with negative sizes diffusers pairs the
  (negative, positive) time ids with the wrong rows (it repeats [neg, pos] B times against a
  [negatives..., positives...] batch); we give each row its branch's ids.
  """
  _, reference, ours = tiny
  latents = _latents()
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=5.0,
                original_size=(48, 40), crops_coords_top_left=(4, 2), target_size=(32, 32))
  prompts = PROMPTS
  if negative == "prompts":
    prompts, latents = PROMPTS[1:], latents[:1]
    kwargs.update(negative_prompt="a blue dog", negative_original_size=(16, 24),
                  negative_crops_coords_top_left=(0, 8), negative_target_size=(24, 24))
  with torch.no_grad():
    expected_latents = reference(prompts, latents=torch.from_numpy(latents),
                                 output_type="latent", **kwargs).images.numpy()
    expected = reference(prompts, latents=torch.from_numpy(latents), output_type="np",
                         **kwargs).images
  got_latents = ours(prompts, latents=latents, output_type="latent", **kwargs)
  assert _rel_err(got_latents, expected_latents) <= 1e-4
  got = ours(prompts, latents=latents, **kwargs)
  assert got.shape == expected.shape == (len(prompts), HEIGHT, WIDTH, 3)
  assert np.abs(got - expected).max() <= 1e-3
  assert np.abs(expected - expected[:, :1, :1]).max() > 0.05  # the images are not flat
  uncropped = ours(prompts, latents=latents, **{**kwargs, "crops_coords_top_left": (0, 0)})
  assert np.abs(uncropped - got).max() > 1e-3  # the micro-conditioning reaches the image


def _turbo(tiny, scheduler_class):
  """(diffusers pipeline, ours) of the tiny folder's models with SDXL-Turbo's scheduler config
  (trailing spacing) read into `scheduler_class` (diffusers' Euler or Euler ancestral)."""
  _, reference, ours = tiny
  scheduler = scheduler_class(**SDXL_TURBO_SCHEDULER)
  turbo_reference = diffusers.StableDiffusionXLPipeline(**{**reference.components,
                                                           "scheduler": scheduler})
  turbo = StableDiffusionXLPipeline(
      ours.unet, ours.vae, ours.text_encoder, ours.text_encoder_2, ours.tokenizer,
      ours.tokenizer_2, schedulers.scheduler_from_config(json.loads(scheduler.to_json_string())))
  return turbo_reference, turbo


@pytest.mark.slow
@pytest.mark.parity
def test_turbo_one_step_without_guidance_matches_diffusers(tiny):
  """SDXL-Turbo's settings: Euler ancestral, trailing spacing, 1 step, guidance 0 (at one step
  the ancestral noise level is 0, so diffusers' torch noise does not enter the image)."""
  reference, ours = _turbo(tiny, diffusers.EulerAncestralDiscreteScheduler)
  assert isinstance(ours.scheduler, schedulers.EulerAncestralDiscreteScheduler)
  latents = _latents(1)
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=0.0,
                output_type="latent")
  with torch.no_grad():
    expected = reference(PROMPTS, latents=torch.from_numpy(latents), **kwargs).images.numpy()
  got = ours(PROMPTS, latents=latents, **kwargs)
  assert _rel_err(got, expected) <= 1e-4
  # Two ancestral steps: fresh noise per step from the seed, the same for the same seed.
  steps = {**kwargs, "num_inference_steps": 2}
  first, again = ours(PROMPTS, seed=3, **steps), ours(PROMPTS, seed=3, **steps)
  np.testing.assert_array_equal(first, again)
  assert np.abs(ours(PROMPTS, seed=4, **steps) - first).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parity
def test_turbo_trailing_euler_steps_match_diffusers(tiny):
  """SDXL-Turbo with plain Euler and trailing spacing, 2 and 4 steps without guidance: the whole
  run matches diffusers'."""
  reference, ours = _turbo(tiny, diffusers.EulerDiscreteScheduler)
  assert isinstance(ours.scheduler, schedulers.EulerDiscreteScheduler)
  latents = _latents(2)
  for steps in (2, 4):
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=0.0,
                  output_type="latent")
    with torch.no_grad():
      expected = reference(PROMPTS, latents=torch.from_numpy(latents), **kwargs).images.numpy()
    assert _rel_err(ours(PROMPTS, latents=latents, **kwargs), expected) <= 1e-4, steps


TWO_DEVICES = textwrap.dedent("""
  import sys
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  import numpy as np
  import convert.loading
  from pipelines.sdxl import StableDiffusionXLPipeline
  folder, out = sys.argv[1], sys.argv[2]
  pipe = StableDiffusionXLPipeline.from_pretrained(folder)
  kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=0.0, seed=5)
  prompts = ["a red cat", "a blue dog", "a green bird"]
  np.save(out + "/two.npy", pipe(prompts, devices=2, **kw))
  np.save(out + "/one.npy", pipe(prompts, devices=1, **kw))
""")


@pytest.mark.slow
def test_two_devices_give_the_images_of_one(tmp_path):
  """Data parallel over two CPU devices (three prompts: the batch is padded), with Euler
  ancestral: the per-image noise keys are split with the batch, so each image is the one a
  single device makes."""
  folder = tmp_path / "turbo"
  save_tiny_sdxl_pipeline(folder, turbo=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(folder), str(tmp_path)],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two, one = np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy")
  assert two.shape == (3, HEIGHT, WIDTH, 3)
  np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
  assert np.abs(two[0] - two[1]).max() > 1e-3


@pytest.mark.slow
def test_calibrate_and_quantize_through_the_unet(tmp_path):
  """The DiTs' calls: `calibrate` records the UNet's linears over an eager sampling run and
  `quantize_model` applies svdquant-int4 with the default scope; the quantized pipeline runs
  jitted (the fused loop) and its error against the float pipeline is printed."""
  save_tiny_sdxl_pipeline(tmp_path, seed=1)
  pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path)
  kwargs = dict(height=HEIGHT, width=WIDTH, seed=0, guidance_scale=5.0)
  float_images = pipe(PROMPTS[:1], num_inference_steps=2, **kwargs)

  def run(prompt):
    pipe(prompt, num_inference_steps=1, output_type="latent", jit=False, **kwargs)

  stats = calibrate(run, PROMPTS[:1], model=pipe.unet, progress=False)
  assert "mid_block/attentions/0/transformer_blocks/1/attn1/to_q/kernel" in stats
  # The tiny widths (16, 32) need small groups and rank; a short smoothing grid keeps it quick.
  config = QuantConfig.preset("svdquant-int4", group_size=8, rank=4, smooth=(0.3, 0.5),
                              svd_iters=2)
  quantize_model(pipe.unet, stats, config, progress=False)
  pipe._runners.clear()
  block = pipe.unet.mid_block.attentions[0].transformer_blocks[1]
  assert is_quantized(block.attn1.to_q.kernel.get_value())
  assert is_quantized(block.attn1.to_out[0].kernel.get_value())
  assert is_quantized(block.attn2.to_q.kernel.get_value())
  assert is_quantized(block.ff.net[0].proj.kernel.get_value())
  assert is_quantized(block.ff.net[2].kernel.get_value())
  assert not is_quantized(block.attn2.to_k.kernel.get_value())  # acts on the text: 16-bit
  assert not is_quantized(block.attn2.to_v.kernel.get_value())
  assert not is_quantized(pipe.unet.mid_block.attentions[0].proj_in.kernel.get_value())
  assert not is_quantized(pipe.unet.mid_block.resnets[0].time_emb_proj.kernel.get_value())
  images = pipe(PROMPTS[:1], num_inference_steps=2, **kwargs)
  err = float(np.abs(images - float_images).mean())
  print(f"\nquantized tiny SDXL pipeline (jitted loop), mean |image error| vs float: {err:.4f}")
  assert 0 < err < 0.1


def test_nan_weights_name_the_unet_and_the_step(tiny):
  """A NaN weight in the UNet: the fused loop names the unet and the first step (the shapes of
  the guided one-prompt parity case, so its compiled loop is reused)."""
  _, _, ours = tiny
  kernel = ours.unet.conv_out.kernel
  original = kernel.get_value()
  kernel.set_value(original.at[0, 0, 0, 0].set(jnp.nan))
  try:
    with pytest.raises(pipelines.NonFiniteError, match="the unet made the latents NaN or inf at "
                       "denoising step 1 of 3"):
      ours(PROMPTS[:1], height=HEIGHT, width=WIDTH, num_inference_steps=3, output_type="latent")
  finally:
    kernel.set_value(original)


def test_bad_inputs_and_folders(tiny, tmp_path):
  folder, _, ours = tiny
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1)
  with pytest.raises(InputError, match="StableDiffusionXLPipeline: height and width must be "
                     "positive multiples of 4, got 30x32"):
    ours(PROMPTS, height=30, width=WIDTH)
  with pytest.raises(InputError, match=re.escape("crops_coords_top_left must be two non-negative "
                                                 "integers, got (1,)")):
    ours(PROMPTS, crops_coords_top_left=(1,), **kwargs)
  with pytest.raises(InputError, match="2 negative prompts for 1 prompts"):
    ours(PROMPTS[:1], negative_prompt=["a", "b"], **kwargs)
  with pytest.raises(InputError, match=re.escape("negative_prompt must be a string or a non-empty "
                                                 "list of strings, got []")):
    StableDiffusionXLPipeline.check_call("here", PROMPTS, [], height=32, width=32,
                                         size_multiple=4)
  with pytest.raises(InputError, match="latents must be"):
    ours(PROMPTS, latents=np.zeros((1, 4, 8, 8), np.float32), **kwargs)
  with pytest.raises(InputError, match="output_type must be 'np' or 'latent'"):
    ours(PROMPTS, output_type="pil", **kwargs)
  index = json.loads((folder / "model_index.json").read_text())
  copy = _copy_configs(folder, tmp_path / "flux")
  (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
  (copy / "transformer").mkdir()
  (copy / "transformer" / "config.json").write_text(
      json.dumps({"_class_name": "FluxTransformer2DModel"}))
  with pytest.raises(CheckpointError, match="names 'FluxPipeline', expected "
                     "StableDiffusionXLPipeline"):
    StableDiffusionXLPipeline.from_pretrained(copy)
  copy = _copy_configs(folder, tmp_path / "flow")
  (copy / "scheduler" / "scheduler_config.json").write_text(
      json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
  with pytest.raises(CheckpointError, match="noise-prediction scheduler"):
    StableDiffusionXLPipeline.from_pretrained(copy)
  copy = _copy_configs(folder, tmp_path / "zeros")
  (copy / "model_index.json").write_text(json.dumps({**index,
                                                     "force_zeros_for_empty_prompt": "yes"}))
  with pytest.raises(CheckpointError, match="force_zeros_for_empty_prompt must be true or false"):
    StableDiffusionXLPipeline.from_pretrained(copy)


def _copy_configs(folder: Path, copy: Path) -> Path:
  """Links every component of `folder` into `copy`, with its own model_index.json and scheduler
  folder that a test may rewrite."""
  copy.mkdir()
  for entry in folder.iterdir():
    if entry.name == "scheduler":
      (copy / "scheduler").mkdir()
      (copy / "scheduler" / "scheduler_config.json").write_text(
          (entry / "scheduler_config.json").read_text())
    elif entry.name == "model_index.json":
      (copy / entry.name).write_text(entry.read_text())
    else:
      os.symlink(entry, copy / entry.name)
  return copy



def test_size_multiple_is_read_from_configs(tiny, monkeypatch):
  """The VAE's downsampling times the UNet's (here 2 x 2), from the folder's config files only."""
  folder, reference, ours = tiny

  def load(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", load)
  unet_factor = 2 ** (len(reference.unet.config.block_out_channels) - 1)
  assert pipelines.image_size_multiple(folder) == reference.vae_scale_factor * unet_factor == 4
  assert ours.size_multiple(ours.vae.config, ours.unet.config) == 4
  assert pipelines.PipelineFolder.read(folder).denoiser_name == "unet"


def test_convert_writes_a_folder_the_pipeline_loads(tiny, tmp_path):
  """`svdq-jax convert` of an SDXL folder (convert.api): the UNet and both CLIP encoders become
  our checkpoints, tokenizers and scheduler are copied, and the pipeline loads the result with
  the same weights."""
  from convert import convert
  from svdq_jax.tree import named_leaves

  folder, _, ours = tiny
  out = convert(folder, tmp_path / "converted", progress=False)
  header = json.loads((out / "unet" / "config.json").read_text())["svdq_jax"]
  assert header["model_type"] == "unet"
  assert json.loads((out / "text_encoder_2" / "config.json").read_text())["svdq_jax"][
      "model_type"] == "clip"
  loaded = StableDiffusionXLPipeline.from_pretrained(out)
  assert loaded.unet.config == ours.unet.config
  assert loaded.text_encoder_2.config.projection_dim == 20
  original = dict(named_leaves(nnx.state(ours.unet)))
  for path, leaf in named_leaves(nnx.state(loaded.unet)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original[path]))
