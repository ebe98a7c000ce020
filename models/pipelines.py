"""Text-to-image pipelines with the whole denoising loop as one jitted function.

`FluxPipeline` (FLUX.1-dev with its guidance embedding, FLUX.1-schnell) and `PixArtSigmaPipeline`
(classifier-free guidance) read a diffusers pipeline folder (`model_index.json` plus one folder per
component) or the same layout written by `svdq-jax quantize` / `convert` (component folders whose
config.json carries our "svdq_jax" header). Calling a pipeline:

  1. tokenizes on the host and encodes the prompts with the jitted text encoders;
  2. draws the initial latents from `jax.random.key(seed)` (or takes `latents`);
  3. runs every denoising step inside one `jax.jit` of a `lax.fori_loop` (compiled once per
     shape: batch, resolution, number of steps), on one device or data-parallel over `devices`
     with `models.sharding.data_parallel` (weights replicated, batch split); the step itself is
     a pure function `step(state, schedule, i, carry, *conditions) -> carry`;
  4. decodes with the jitted VAE and returns images (B, H, W, 3) float32 in [0, 1].

Progress bar (`progress=True`): the one-step body is compiled on its own and called once per step
from Python, which waits for each step and advances a tqdm bar. The alternative is a
`jax.debug.callback` inside the fused loop. Measured with `python benchmarks/sampling.py
--progress-overhead` (CPU, 2 shared cores, tiny FLUX, 8 steps, median of 5-9 runs; the fused
loop without a bar took 4-11 ms/step), added cost per step in four runs: debug.callback +2.2,
+2.8, +8.2, +2.9 ms; per-step body with a host sync +1.6, -2.1, +2.4, +3.6 ms. The per-step body
was cheaper in three of four runs (median +2.0 against +2.85 ms), keeps host callbacks out of the
compiled loop (under data parallelism a callback fires once per device), and at a width of 768
(3.7-4.0 s/step) neither cost was measurable. Not measured on a GPU. Without a progress bar the
whole loop is one `lax.fori_loop` in one jitted function.

Same seed, same image: the noise comes from `jax.random.key(seed)` for the whole batch on the
host side of the mesh, so the image does not depend on the device count, and runs on CPU repeat
bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.loading import read_component_config, read_json_object
from convert.safetensors_io import CheckpointError
from models import schedulers, sharding
from models.tokenizers import Tokenizer
from svdq_jax.errors import InputError

PNG_SOFTWARE = "svdq-jax"


# ----------------------------------------------------------------------------------------------
# Small shared pieces.


def _jit_module(module: nnx.Module, method: str = "__call__") -> Callable[..., Any]:
  """`module.method` jitted with the parameters as an argument (not baked in as constants)."""
  graphdef, state = nnx.split(module)

  def call(state, *args, **kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

  jitted = jax.jit(call)
  return lambda *args, **kwargs: jitted(state, *args, **kwargs)


def read_model_index(path: str | os.PathLike) -> dict:
  """The model_index.json of a pipeline folder: `_class_name` and one entry per component.

  Raises:
    CheckpointError (an InputError) naming the folder or file: no such folder, no
    model_index.json, or one that is unreadable, not UTF-8 JSON, or not a JSON object.
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: pipeline folder does not exist")
  if not (path / "model_index.json").exists():
    raise CheckpointError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
  return read_json_object(path / "model_index.json")


def pipeline_name(path: str | os.PathLike) -> str:
  """The pipeline class a folder's model_index.json names, checked to be one of `PIPELINES`.

  Raises:
    CheckpointError (an InputError) as `read_model_index`, or for a pipeline we do not have.
  """
  name = read_model_index(path).get("_class_name")
  if name not in PIPELINES:
    raise CheckpointError(f"{path}: pipeline {name!r} is not supported (supported: "
                          f"{sorted(PIPELINES)})")
  return name


def _read_scheduler(path: Path) -> schedulers.Scheduler:
  """The scheduler of a pipeline folder; errors name its scheduler_config.json."""
  file = path / "scheduler" / "scheduler_config.json"
  try:
    return schedulers.scheduler_from_config(read_json_object(file))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"{file}: {e}") from e


def _prompts(prompt: str | Sequence[str]) -> list[str]:
  """The batch of prompts: one string, or a non-empty sequence of strings; InputError else."""
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise InputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
  return prompts


def _check_outputs(what: str, num_images_per_prompt: int, output_type: str) -> None:
  """Raises InputError naming `what` unless num_images_per_prompt >= 1 and output_type is one
  the pipelines produce ("np" images or "latent")."""
  if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or (
      num_images_per_prompt < 1):
    raise InputError(f"{what}: num_images_per_prompt must be an integer >= 1, got "
                     f"{num_images_per_prompt!r}")
  if output_type not in ("np", "latent"):
    raise InputError(f"{what}: output_type must be 'np' or 'latent', got {output_type!r}")


def check_image_size(what: str, height: int, width: int, multiple: int) -> None:
  """Raises InputError naming `what` unless height and width are positive multiples of `multiple`
  (a pipeline's `size_multiple`, or `image_size_multiple` of its folder)."""
  if height <= 0 or width <= 0 or height % multiple or width % multiple:
    raise InputError(f"{what}: height and width must be positive multiples of {multiple}, got "
                     f"{height}x{width}")


def _to_images(decoded: jax.Array) -> np.ndarray:
  """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1] (diffusers' "np")."""
  images = np.asarray(decoded, np.float32).transpose(0, 2, 3, 1)
  return np.clip(images / 2 + 0.5, 0.0, 1.0)


def fused_loop(step: Callable[..., Any], scheduler: schedulers.Scheduler
               ) -> Callable[..., jax.Array]:
  """`denoise(state, schedule, latents, *conditions) -> latents`: every step in one fori_loop."""

  def denoise(state, schedule, latents, *conditions):
    def body(i, carry):
      return step(state, schedule, i, carry, *conditions)

    init = (latents, scheduler.init_state(latents))
    return jax.lax.fori_loop(0, schedule.num_steps, body, init)[0]

  return denoise


def _denoise(make_step: Callable[[bool], Callable[..., Any]], scheduler: schedulers.Scheduler,
             runners: dict, *, state: Any, schedule: schedulers.Schedule, latents: jax.Array,
             conditions: tuple, condition_axes: tuple, devices: int | None, progress: bool,
             jit: bool) -> jax.Array:
  """Runs the denoising loop and returns the final latents.

  jit and no progress: the fused loop, jitted (or data-parallel over `devices`). jit and
  progress: the jitted one-step body, called per step with a tqdm bar. Not jit: eager steps in
  Python (calibration). `runners` caches the compiled functions per (mode, device count).
  """
  num_steps = schedule.num_steps
  carry = (latents, scheduler.init_state(latents))
  if not jit:
    step = make_step(True)
    for i in range(num_steps):
      carry = step(state, schedule, jnp.int32(i), carry, *conditions)
    return carry[0]
  count = devices or 1
  key = ("per-step" if progress else "fused", count)
  if key not in runners:
    step = make_step(False)
    fn, axes = ((step, (None, None, None, 0, *condition_axes)) if progress
                else (fused_loop(step, scheduler), (None, None, 0, *condition_axes)))
    runners[key] = (jax.jit(fn) if count == 1
                    else sharding.data_parallel(fn, devices=count, in_axes=axes))
  run = runners[key]
  if not progress:
    return run(state, schedule, latents, *conditions)
  from tqdm.auto import tqdm  # noqa: PLC0415

  if count > 1:  # placed once here, so the per-step calls find the weights already replicated
    state, schedule = sharding.replicate((state, schedule), run.mesh)
  with tqdm(total=num_steps, desc="denoising", unit="step") as bar:
    for i in range(num_steps):
      carry = jax.block_until_ready(run(state, schedule, jnp.int32(i), carry, *conditions))
      bar.update(1)
  return carry[0]


# ----------------------------------------------------------------------------------------------
# FLUX.1


def pack_latents(latents: jax.Array) -> jax.Array:
  """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, as diffusers' FluxPipeline."""
  b, c, h, w = latents.shape
  x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `pack_latents` for a (h, w) latent grid: (B, S, 4C) -> (B, C, h, w)."""
  b, _, channels = latents.shape
  x = latents.reshape(b, h // 2, w // 2, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int) -> jax.Array:
  """(h/2 * w/2, 3) float32 position ids (0, row, column) of the packed latent tokens."""
  rows, cols = jnp.meshgrid(jnp.arange(h // 2), jnp.arange(w // 2), indexing="ij")
  return jnp.stack([jnp.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(jnp.float32)


def flux_step_fn(transformer: nnx.Module, scheduler: schedulers.FlowMatchEulerScheduler, *,
                 eager: bool = False) -> Callable[..., Any]:
  """One FLUX denoising step as a pure function.

  Returns `step(state, schedule, i, (latents, scheduler_state), prompt_embeds, pooled, guidance,
  img_ids, txt_ids) -> (latents, scheduler_state)` where `state` is `nnx.state(transformer)`
  (plain or quantized), latents (B, S, 4C), prompt_embeds (B, T, D), pooled (B, P), guidance (B,)
  (unused without a guidance embedding), img_ids (S, 3), txt_ids (T, 3). `eager` runs the
  transformer object itself, so that `calibrate` sees its kernels; `fused_loop(step, scheduler)`
  makes the whole loop.
  """
  graphdef, _ = nnx.split(transformer)
  guidance_embeds = bool(transformer.config.guidance_embeds)

  def step(state, schedule, i, carry, prompt_embeds, pooled, guidance, img_ids, txt_ids):
    model = transformer if eager else nnx.merge(graphdef, state)
    x, scheduler_state = carry
    timestep = jnp.broadcast_to(schedule.timesteps[i], x.shape[:1]).astype(x.dtype)
    velocity = model(hidden_states=x, encoder_hidden_states=prompt_embeds,
                     pooled_projections=pooled, timestep=timestep / 1000, img_ids=img_ids,
                     txt_ids=txt_ids, guidance=guidance if guidance_embeds else None)
    return scheduler.step(schedule, scheduler_state, i, velocity, x)

  return step


class FluxPipeline:
  """FLUX.1 text-to-image: CLIP pooled + T5 features, flow-matching Euler, 16-channel VAE.

  Args:
    transformer: `models.flux.FluxTransformer` (plain or quantized).
    vae: `models.vae.AutoencoderKL`.
    text_encoder: `models.clip.CLIPTextModel` (pooled output).
    text_encoder_2: `models.t5.T5Encoder`.
    tokenizer, tokenizer_2: CLIP and T5 tokenizers.
    scheduler: `FlowMatchEulerScheduler` (dynamic shift for dev, none for schnell).
  """

  def __init__(self, transformer: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module,
               text_encoder_2: nnx.Module, tokenizer: Tokenizer, tokenizer_2: Tokenizer,
               scheduler: schedulers.FlowMatchEulerScheduler):
    self.transformer = transformer
    self.vae = vae
    self.text_encoder = text_encoder
    self.text_encoder_2 = text_encoder_2
    self.tokenizer = tokenizer
    self.tokenizer_2 = tokenizer_2
    self.scheduler = scheduler
    self.guidance_embeds = bool(transformer.config.guidance_embeds)
    self.vae_scale_factor = vae.config.downsample_factor
    self._clip = _jit_module(text_encoder)
    self._t5 = _jit_module(text_encoder_2)
    self._decode = _jit_module(vae, "decode")
    self._runners: dict = {}  # compiled loops, see `_denoise`

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: jnp.dtype | None = None
                      ) -> FluxPipeline:
    """Loads a diffusers `FluxPipeline` folder, or ours of the same layout.

    dtype: computation and parameter dtype of every model (None: float32).
    """
    from models.clip import CLIPTextModel  # noqa: PLC0415
    from models.flux import FluxTransformer  # noqa: PLC0415
    from models.t5 import T5Encoder  # noqa: PLC0415
    from models.vae import AutoencoderKL  # noqa: PLC0415

    path = Path(path)
    index = read_model_index(path)
    if index.get("_class_name") != "FluxPipeline":
      raise CheckpointError(f"{path}: model_index.json names {index.get('_class_name')!r}, "
                            "expected FluxPipeline")
    scheduler = _read_scheduler(path)
    if not isinstance(scheduler, schedulers.FlowMatchEulerScheduler):
      raise CheckpointError(f"{path}/scheduler: FluxPipeline needs a "
                            f"FlowMatchEulerDiscreteScheduler, got {scheduler.class_name}")
    return cls(
        transformer=FluxTransformer.from_pretrained(path / "transformer", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(path / "vae", dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype),
        text_encoder_2=T5Encoder.from_pretrained(path / "text_encoder_2", dtype=dtype),
        tokenizer=Tokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=Tokenizer.from_pretrained(path / "tokenizer_2"),
        scheduler=scheduler)

  @staticmethod
  def size_multiple(vae_config: Any, transformer_config: Any) -> int:
    """What height and width must be multiples of: the VAE's downsampling times the 2x2 packing
    of latents into tokens (16 for FLUX.1); `transformer_config` does not change it."""
    return vae_config.downsample_factor * 2

  def encode_prompt(self, prompts: Sequence[str], *, max_sequence_length: int = 512
                    ) -> tuple[jax.Array, jax.Array]:
    """(T5 features (B, max_sequence_length, 4096), CLIP pooled (B, 768)) in the encoders' dtype."""
    clip_ids = self.tokenizer(list(prompts), self.tokenizer.model_max_length or 77).input_ids
    pooled = self._clip(jnp.asarray(clip_ids)).pooler_output
    t5_ids = self.tokenizer_2(list(prompts), max_sequence_length).input_ids
    return self._t5(jnp.asarray(t5_ids)), pooled

  def latent_shape(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the unpacked latent grid for an image size (even, as packing needs)."""
    f = self.vae_scale_factor * 2
    return 2 * (height // f), 2 * (width // f)

  def __call__(self, prompt: str | Sequence[str], negative_prompt: str | None = None, *,
               height: int = 1024, width: int = 1024, num_inference_steps: int = 28,
               guidance_scale: float | None = None, seed: int | None = 0,
               key: jax.Array | None = None, num_images_per_prompt: int = 1,
               latents: jax.Array | None = None, max_sequence_length: int = 512,
               devices: int | None = None, progress: bool = False,
               output_type: str = "np", jit: bool = True) -> np.ndarray:
    """Generates images.

    Args:
      prompt: one prompt or a list (the batch).
      negative_prompt: not used by FLUX.1 (guidance-distilled); must be None.
      height, width: image size, multiples of 16 (the VAE factor times the 2x2 packing).
      num_inference_steps: denoising steps (dev: 28-50, schnell: 1-4).
      guidance_scale: the distilled guidance of FLUX.1-dev (default 3.5); ignored by schnell.
      seed / key: randomness of the initial latents (key wins when both are given).
      num_images_per_prompt: images per prompt; the batch is B = len(prompts) * this.
      latents: packed initial latents (B, h/2 * w/2, 4C) instead of drawn ones.
      max_sequence_length: T5 tokens (512 for dev, 256 is common for schnell).
      devices: run data-parallel over this many devices (None: one).
      progress: show a progress bar of the steps (runs the compiled one-step body per step).
      output_type: "np" for images, "latent" for the final packed latents.
      jit: False runs the steps eagerly in Python, one model call at a time (for `calibrate`;
        slow, and without data parallelism).

    Returns:
      (B, height, width, 3) float32 in [0, 1], or the packed latents for "latent".

    Raises:
      InputError for a negative prompt, an empty or non-string prompt, num_images_per_prompt
      below 1, an unknown output_type, a size that is not a positive multiple of
      `size_multiple`, or latents of the wrong shape.
    """
    if negative_prompt is not None:
      raise InputError("FluxPipeline: negative_prompt is not supported (FLUX.1 is guidance-"
                       "distilled; use guidance_scale)")
    prompts = _prompts(prompt)
    _check_outputs("FluxPipeline", num_images_per_prompt, output_type)
    check_image_size("FluxPipeline", height, width,
                     self.size_multiple(self.vae.config, self.transformer.config))
    batch = len(prompts) * num_images_per_prompt
    prompt_embeds, pooled = self.encode_prompt(prompts, max_sequence_length=max_sequence_length)
    prompt_embeds = jnp.repeat(prompt_embeds, num_images_per_prompt, axis=0)
    pooled = jnp.repeat(pooled, num_images_per_prompt, axis=0)
    h, w = self.latent_shape(height, width)
    channels = self.transformer.config.in_channels // 4
    dtype = prompt_embeds.dtype
    if latents is None:
      key = jax.random.key(seed or 0) if key is None else key
      latents = pack_latents(jax.random.normal(key, (batch, channels, h, w), jnp.float32))
    expected = (batch, (h // 2) * (w // 2), channels * 4)
    if tuple(latents.shape) != expected:
      raise InputError(f"FluxPipeline: latents must be {expected}, got {tuple(latents.shape)}")
    latents = jnp.asarray(latents).astype(dtype)
    schedule = self.scheduler.schedule(num_inference_steps, image_seq_len=expected[1])
    guidance = jnp.full((batch,), 3.5 if guidance_scale is None else guidance_scale,
                        jnp.float32)
    txt_ids = jnp.zeros((prompt_embeds.shape[1], 3), jnp.float32)
    latents = _denoise(
        lambda eager: flux_step_fn(self.transformer, self.scheduler, eager=eager),
        self.scheduler, self._runners, state=nnx.state(self.transformer), schedule=schedule,
        latents=latents, conditions=(prompt_embeds, pooled, guidance, latent_image_ids(h, w),
                                     txt_ids),
        condition_axes=(0, 0, 0, None, None), devices=devices, progress=progress, jit=jit)
    if output_type == "latent":
      return np.asarray(latents)
    raw = self.vae.unscale_latents(unpack_latents(latents, h, w))
    return _to_images(self._decode(raw))


# ----------------------------------------------------------------------------------------------
# PixArt-Sigma


class PixArtSigmaPipeline:
  """PixArt-Sigma text-to-image: T5 features with a mask, DPM-Solver++ (or Euler), 4-channel VAE,
  classifier-free guidance when guidance_scale > 1.

  Prompts are lowercased and stripped (diffusers' `clean_caption=False` path); no resolution
  binning: the image has exactly the requested size.
  """

  def __init__(self, transformer: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module,
               tokenizer: Tokenizer, scheduler: schedulers.Scheduler):
    self.transformer = transformer
    self.vae = vae
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.scheduler = scheduler
    self.vae_scale_factor = vae.config.downsample_factor
    self._t5 = _jit_module(text_encoder)
    self._decode = _jit_module(vae, "decode")
    self._runners: dict = {}  # compiled loops, see `_denoise`

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: jnp.dtype | None = None
                      ) -> PixArtSigmaPipeline:
    """Loads a diffusers `PixArtSigmaPipeline` folder, or ours of the same layout."""
    from models.pixart import PixArtSigmaTransformer  # noqa: PLC0415
    from models.t5 import T5Encoder  # noqa: PLC0415
    from models.vae import AutoencoderKL  # noqa: PLC0415

    path = Path(path)
    index = read_model_index(path)
    if index.get("_class_name") != "PixArtSigmaPipeline":
      raise CheckpointError(f"{path}: model_index.json names {index.get('_class_name')!r}, "
                            "expected PixArtSigmaPipeline")
    scheduler = _read_scheduler(path)
    return cls(
        transformer=PixArtSigmaTransformer.from_pretrained(path / "transformer", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(path / "vae", dtype=dtype),
        text_encoder=T5Encoder.from_pretrained(path / "text_encoder", dtype=dtype),
        tokenizer=Tokenizer.from_pretrained(path / "tokenizer"), scheduler=scheduler)

  @staticmethod
  def size_multiple(vae_config: Any, transformer_config: Any) -> int:
    """What height and width must be multiples of: the VAE's downsampling times the
    transformer's patch size (16 for PixArt-Sigma)."""
    return vae_config.downsample_factor * transformer_config.patch_size

  def encode_prompt(self, prompts: Sequence[str], *, max_sequence_length: int = 300
                    ) -> tuple[jax.Array, jax.Array]:
    """(T5 features (B, L, 4096), attention mask (B, L) int32) of lowercased, stripped prompts."""
    tokens = self.tokenizer([p.lower().strip() for p in prompts], max_sequence_length)
    mask = jnp.asarray(tokens.attention_mask)
    return self._t5(jnp.asarray(tokens.input_ids), mask), mask

  def _step_fn(self, guided: bool, eager: bool) -> Callable[..., Any]:
    """`step(state, schedule, i, carry, embeds, mask, neg_embeds, neg_mask, guidance)`."""
    graphdef, _ = nnx.split(self.transformer)
    scheduler, transformer = self.scheduler, self.transformer
    in_channels = transformer.config.in_channels
    learned_sigma = transformer.config.out_channels // 2 == in_channels

    def step(state, schedule, i, carry, embeds, mask, neg_embeds, neg_mask, guidance):
      model = transformer if eager else nnx.merge(graphdef, state)
      x, scheduler_state = carry
      if guided:
        embeds = jnp.concatenate([neg_embeds, embeds])
        mask = jnp.concatenate([neg_mask, mask])
      x_in = jnp.concatenate([x, x]) if guided else x
      x_in = scheduler.scale_model_input(schedule, i, x_in)
      timestep = jnp.broadcast_to(schedule.timesteps[i], x_in.shape[:1])
      out = model(x_in, encoder_hidden_states=embeds, timestep=timestep,
                  encoder_attention_mask=mask)
      if guided:
        uncond, cond = jnp.split(out, 2)
        out = uncond + guidance[:, None, None, None].astype(out.dtype) * (cond - uncond)
      if learned_sigma:
        out = out[:, :in_channels]
      return scheduler.step(schedule, scheduler_state, i, out, x)

    return step

  def __call__(self, prompt: str | Sequence[str], negative_prompt: str | None = None, *,
               height: int = 1024, width: int = 1024, num_inference_steps: int = 20,
               guidance_scale: float | None = None, seed: int | None = 0,
               key: jax.Array | None = None, num_images_per_prompt: int = 1,
               latents: jax.Array | None = None, max_sequence_length: int = 300,
               devices: int | None = None, progress: bool = False,
               output_type: str = "np", jit: bool = True) -> np.ndarray:
    """Generates images; arguments as `FluxPipeline.__call__`, and:

    Args:
      negative_prompt: the unconditional prompt of classifier-free guidance (default "").
      guidance_scale: classifier-free guidance (default 4.5; <= 1 turns guidance off).
      latents: initial noise (B, 4, H/8, W/8); like diffusers, it is multiplied by the
        scheduler's initial noise sigma.
    """
    prompts = _prompts(prompt)
    _check_outputs("PixArtSigmaPipeline", num_images_per_prompt, output_type)
    check_image_size("PixArtSigmaPipeline", height, width,
                     self.size_multiple(self.vae.config, self.transformer.config))
    guidance_scale = 4.5 if guidance_scale is None else guidance_scale
    guided = guidance_scale > 1.0
    batch = len(prompts) * num_images_per_prompt
    embeds, mask = self.encode_prompt(prompts, max_sequence_length=max_sequence_length)
    if guided:
      neg_embeds, neg_mask = self.encode_prompt([negative_prompt or ""] * len(prompts),
                                                max_sequence_length=max_sequence_length)
    else:  # the step ignores them; no second T5 run
      neg_embeds, neg_mask = embeds, mask
    repeat = functools.partial(jnp.repeat, repeats=num_images_per_prompt, axis=0)
    embeds, mask, neg_embeds, neg_mask = map(repeat, (embeds, mask, neg_embeds, neg_mask))
    channels = self.transformer.config.in_channels
    shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
    schedule = self.scheduler.schedule(num_inference_steps)
    if latents is None:
      key = jax.random.key(seed or 0) if key is None else key
      latents = jax.random.normal(key, shape, jnp.float32)
    if tuple(latents.shape) != shape:
      raise InputError(f"PixArtSigmaPipeline: latents must be {shape}, got {latents.shape}")
    sigma = self.scheduler.init_noise_sigma(schedule)
    latents = (jnp.asarray(latents, jnp.float32) * sigma).astype(embeds.dtype)
    guidance = jnp.full((batch,), guidance_scale, jnp.float32)
    latents = _denoise(
        lambda eager: self._step_fn(guided, eager), self.scheduler,
        self._runners.setdefault(guided, {}), state=nnx.state(self.transformer),
        schedule=schedule, latents=latents,
        conditions=(embeds, mask, neg_embeds, neg_mask, guidance),
        condition_axes=(0, 0, 0, 0, 0), devices=devices, progress=progress, jit=jit)
    if output_type == "latent":
      return np.asarray(latents)
    return _to_images(self._decode(self.vae.unscale_latents(latents)))


# ----------------------------------------------------------------------------------------------
# Loading by folder, writing PNGs.

PIPELINES = {"FluxPipeline": FluxPipeline, "PixArtSigmaPipeline": PixArtSigmaPipeline}


def load_pipeline(path: str | os.PathLike, dtype: jnp.dtype | None = None
                  ) -> FluxPipeline | PixArtSigmaPipeline:
  """The pipeline a folder's model_index.json names (`pipeline_name`), loaded with
  `from_pretrained`."""
  return PIPELINES[pipeline_name(path)].from_pretrained(path, dtype=dtype)


def image_size_multiple(path: str | os.PathLike) -> int:
  """What height and width must be multiples of for the pipeline in folder `path`.

  The pipeline's `size_multiple` rule, applied to its VAE's and transformer's configs read by
  `convert.loading.read_component_config` (no weight is read), so a size the pipeline would refuse
  when called is refused before it is loaded.

  Raises:
    CheckpointError (an InputError) naming the folder or file: as `pipeline_name`, or a missing
    or invalid vae/ or transformer/ config.json.
  """
  path = Path(path)
  pipeline = PIPELINES[pipeline_name(path)]
  vae = read_component_config(path / "vae", "vae").config
  transformer = read_component_config(path / "transformer", MODEL_TYPES[pipeline]).config
  return pipeline.size_multiple(vae, transformer)


def save_images(images: np.ndarray, out: str | os.PathLike, *, prompts: Sequence[str],
                seed: int | None, extra: dict[str, str] | None = None) -> list[Path]:
  """Writes (B, H, W, 3) images in [0, 1] as PNGs with prompt and seed in the text metadata.

  One image goes to `out`; several to `<stem>_<index>.png` beside it. Returns the paths.
  """
  from PIL import Image, PngImagePlugin  # noqa: PLC0415

  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"save_images: images must be (B, H, W, 3), got {images.shape}")
  if len(prompts) != len(images):
    raise ValueError(f"save_images: {len(images)} images but {len(prompts)} prompts")
  out = Path(out)
  paths = []
  for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
    path = out if len(images) == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")
    info = PngImagePlugin.PngInfo()
    for name, value in {"prompt": prompt, "seed": str(seed), "batch_index": str(index),
                        "software": PNG_SOFTWARE, **(extra or {})}.items():
      info.add_itxt(name, value)
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, pnginfo=info)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------------------------
# Quantization of a whole pipeline.

MODEL_TYPES = {FluxPipeline: "flux", PixArtSigmaPipeline: "pixart"}


def quantize_transformer(pipe: FluxPipeline | PixArtSigmaPipeline, config: Any,
                         prompts: str | Sequence[str], *, num_inference_steps: int = 4,
                         height: int = 512, width: int = 512, seed: int = 0,
                         progress: bool = True) -> None:
  """Calibrates `pipe.transformer` on prompts and quantizes it in place with `config`.

  Every prompt is sampled eagerly for `num_inference_steps` steps while `svdq_jax.calibrate`
  records the input of every linear layer at every step; `svdq_jax.quantize_model` then applies
  the config (a `QuantConfig`; its `skip` patterns keep the embedders and the final norm and
  projection in 16 bits). Progress bars run per prompt and per layer.
  """
  from svdq_jax import calibrate, quantize_model  # noqa: PLC0415

  prompts = _prompts(prompts)

  def run(prompt: str) -> None:
    pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps, seed=seed,
         output_type="latent", jit=False)

  stats = calibrate(run, prompts, model=pipe.transformer, progress=progress)
  quantize_model(pipe.transformer, stats, config, progress=progress)
  pipe._runners.clear()  # the quantized transformer has other parameter shapes


def quantize_pipeline(src: str | os.PathLike, dst: str | os.PathLike, *, preset: str,
                      prompts: str | Sequence[str], num_inference_steps: int = 4,
                      height: int = 512, width: int = 512, seed: int = 0, overwrite: bool = False,
                      dtype: jnp.dtype | None = None, progress: bool = True) -> Path:
  """Writes a copy of a pipeline folder with its transformer calibrated and quantized.

  `dst` gets the source folder's other components unchanged and the transformer as our
  checkpoint, so `load_pipeline(dst)` (and `svdq-jax sample dst`) reads it directly; the preset
  and calibration settings are recorded in `dst/svdq_quantization.json`.

  Args:
    src: diffusers pipeline folder (or ours).
    dst: output folder, written atomically (replaced only with `overwrite`).
    preset: a `QuantConfig.preset` name, e.g. "svdquant-int4".
    prompts: calibration prompts, one eager sampling run each (a string is one prompt).
    num_inference_steps, height, width, seed: the calibration runs' sampling settings.
    dtype: the models' dtype during calibration (None: float32); the unquantized layers of the
      written transformer keep it.
    progress: progress bars per prompt and per layer.

  Returns:
    The written folder.

  Raises:
    InputError, before any model is loaded, for an unknown preset, an existing `dst` without
    `overwrite`, bad prompts or a size the pipeline cannot make; CheckpointError (an InputError)
    for a bad `src` folder.
  """
  import shutil  # noqa: PLC0415

  from convert.checkpoint import atomic_folder, save_checkpoint  # noqa: PLC0415
  from svdq_jax import QuantConfig  # noqa: PLC0415

  config = QuantConfig.preset(preset)
  if Path(dst).exists() and not overwrite:
    raise InputError(f"{dst}: already exists (remove it or pass overwrite=True)")
  src = Path(src)
  prompts = _prompts(prompts)
  check_image_size(f"quantize_pipeline {str(src)!r}", height, width, image_size_multiple(src))
  pipe = load_pipeline(src, dtype=dtype)
  quantize_transformer(pipe, config, prompts, num_inference_steps=num_inference_steps,
                       height=height, width=width, seed=seed, progress=progress)
  with atomic_folder(dst, overwrite=overwrite) as folder:
    for entry in src.iterdir():
      if entry.name == "transformer":
        continue
      copy = shutil.copytree if entry.is_dir() else shutil.copy2
      copy(entry, folder / entry.name)
    save_checkpoint(pipe.transformer, folder / "transformer", model_type=MODEL_TYPES[type(pipe)],
                    config=pipe.transformer.config)
    quant_note = {"preset": preset, "quant_config": config.to_dict(), "calibration": {
        "prompts": len(prompts), "num_inference_steps": num_inference_steps, "height": height,
        "width": width, "seed": seed}}
    (folder / "svdq_quantization.json").write_text(json.dumps(quant_note, indent=2) + "\n")
  return Path(dst)
