"""StableDiffusionXLPipeline against diffusers' from the same saved tiny folder: classifier-free
guidance with negative prompts and micro-conditioning, zeroed negatives, SDXL-Turbo's one-step
Euler ancestral; seeds, data parallelism, calibration and quantization through the UNet."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from convert.safetensors_io import CheckpointError  # noqa: E402
from models import schedulers  # noqa: E402
from pipelines.sdxl import StableDiffusionXLPipeline  # noqa: E402
from svdq_jax import QuantConfig, calibrate, is_quantized, quantize_model  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from tests.models._pipeline_reference import (  # noqa: E402  (needs torch, checked above)
  HEIGHT,
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


@pytest.mark.parity
@pytest.mark.parametrize("negative", ["prompts", "zeros"])
def test_guided_pipeline_matches_diffusers(tiny, negative):
  """CFG 5 over 3 Euler steps with micro-conditioning: a negative prompt with its own
  micro-conditioning, or two prompts without a negative one (force_zeros_for_empty_prompt: zero
  negative features).

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
    expected = reference(prompts, latents=torch.from_numpy(latents), output_type="np",
                         **kwargs).images
  got = ours(prompts, latents=latents, **kwargs)
  assert got.shape == expected.shape == (len(prompts), HEIGHT, WIDTH, 3)
  assert np.abs(got - expected).max() <= 1e-3
  assert np.abs(expected - expected[:, :1, :1]).max() > 0.05  # the images are not flat
  uncropped = ours(prompts, latents=latents, **{**kwargs, "crops_coords_top_left": (0, 0)})
  assert np.abs(uncropped - got).max() > 1e-3  # the micro-conditioning reaches the image


@pytest.mark.parity
def test_turbo_one_step_without_guidance_matches_diffusers(tmp_path):
  """SDXL-Turbo's settings: Euler ancestral, trailing spacing, 1 step, guidance 0 (at one step
  the ancestral noise level is 0, so diffusers' torch noise does not enter the image)."""
  reference = save_tiny_sdxl_pipeline(tmp_path, turbo=True)
  ours = StableDiffusionXLPipeline.from_pretrained(tmp_path)
  assert isinstance(ours.scheduler, schedulers.EulerAncestralDiscreteScheduler)
  latents = _latents(1)
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=0.0)
  with torch.no_grad():
    expected = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                         **kwargs).images
  got = ours(PROMPTS, latents=latents, **kwargs)
  assert np.abs(got - expected).max() <= 1e-3
  # More ancestral steps: fresh noise per step from the seed, the same for the same seed.
  steps = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=0.0)
  first, again = ours(PROMPTS, seed=3, **steps), ours(PROMPTS, seed=3, **steps)
  np.testing.assert_array_equal(first, again)
  assert np.abs(ours(PROMPTS, seed=4, **steps) - first).max() > 1e-3


TWO_DEVICES = textwrap.dedent("""
  import sys
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  import numpy as np
  from pipelines.sdxl import StableDiffusionXLPipeline
  folder, out = sys.argv[1], sys.argv[2]
  pipe = StableDiffusionXLPipeline.from_pretrained(folder)
  kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=0.0, seed=5)
  prompts = ["a red cat", "a blue dog"]
  np.save(out + "/two.npy", pipe(prompts, devices=2, **kw))
  np.save(out + "/one.npy", pipe(prompts, devices=1, **kw))
""")


@pytest.mark.slow
def test_two_devices_give_the_images_of_one(tmp_path):
  """Data parallel over two CPU devices, with Euler ancestral: the per-image noise keys are split
  with the batch, so each image is the one a single device makes."""
  folder = tmp_path / "turbo"
  save_tiny_sdxl_pipeline(folder, turbo=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(folder), str(tmp_path)],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two, one = np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy")
  assert two.shape == (2, HEIGHT, WIDTH, 3)
  np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
  assert np.abs(two[0] - two[1]).max() > 1e-3


@pytest.mark.slow
def test_calibrate_and_quantize_through_the_unet(tmp_path):
  """The DiTs' calls: `calibrate` records the UNet's linears over an eager sampling run and
  `quantize_model` applies svdquant-int4 with the default scope; the quantized pipeline runs
  jitted and its error against the float pipeline is reported."""
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
  assert is_quantized(block.attn2.to_q.kernel.get_value())
  assert is_quantized(block.ff.net[0].proj.kernel.get_value())
  assert not is_quantized(block.attn2.to_k.kernel.get_value())  # acts on the text: 16-bit
  assert not is_quantized(pipe.unet.mid_block.attentions[0].proj_in.kernel.get_value())
  assert not is_quantized(pipe.unet.mid_block.resnets[0].time_emb_proj.kernel.get_value())
  images = pipe(PROMPTS[:1], num_inference_steps=2, **kwargs)
  err = float(np.abs(images - float_images).mean())
  print(f"\nquantized tiny SDXL pipeline, mean |image error| vs float: {err:.4f}")
  assert 0 < err < 0.1


def test_bad_inputs_and_folders(tiny, tmp_path):
  folder, _, ours = tiny
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1)
  with pytest.raises(InputError, match="multiples of 4"):
    ours(PROMPTS, height=30, width=WIDTH)
  with pytest.raises(InputError, match="crops_coords_top_left"):
    ours(PROMPTS, crops_coords_top_left=(1,), **kwargs)
  with pytest.raises(InputError, match="2 negative prompts for 1 prompts"):
    ours(PROMPTS[:1], negative_prompt=["a", "b"], **kwargs)
  with pytest.raises(InputError, match="latents must be"):
    ours(PROMPTS, latents=np.zeros((1, 4, 8, 8), np.float32), **kwargs)
  index = json.loads((folder / "model_index.json").read_text())
  (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
  with pytest.raises(CheckpointError, match="expected StableDiffusionXLPipeline"):
    StableDiffusionXLPipeline.from_pretrained(tmp_path)
  (tmp_path / "model_index.json").write_text(json.dumps(index))
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(
      json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
  with pytest.raises(CheckpointError, match="noise-prediction scheduler"):
    StableDiffusionXLPipeline.from_pretrained(tmp_path)


def test_convert_writes_a_folder_the_pipeline_loads(tiny, tmp_path):
  """`svdq-jax convert` of an SDXL folder (convert.api): the UNet and both CLIP encoders become
  our checkpoints, tokenizers and scheduler are copied, and the pipeline loads the result."""
  from flax import nnx

  from convert import convert
  from svdq_jax.tree import named_leaves

  folder, _, ours = tiny
  out = convert(folder, tmp_path / "converted", progress=False)
  header = json.loads((out / "unet" / "config.json").read_text())["svdq_jax"]
  assert header["model_type"] == "unet"
  loaded = StableDiffusionXLPipeline.from_pretrained(out)
  assert loaded.unet.config == ours.unet.config
  assert loaded.text_encoder_2.config.projection_dim == 20
  original = dict(named_leaves(nnx.state(ours.unet)))
  for path, leaf in named_leaves(nnx.state(loaded.unet)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original[path]))
