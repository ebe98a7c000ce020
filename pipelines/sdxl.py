"""SDXL and SDXL-Turbo text-to-image: two CLIP encoders, the UNet, the 4-channel VAE, the whole
denoising loop in one jitted function (`pipelines.loop`).

As diffusers' `StableDiffusionXLPipeline`:

  - text features: the penultimate hidden states of CLIP ViT-L (`text_encoder`) and OpenCLIP
    ViT-bigG (`text_encoder_2`), concatenated (B, 77, 768 + 1280); the pooled text embedding is
    bigG's projection (`text_embeds`, B, 1280);
  - micro-conditioning: `time_ids` = original size + crop top-left + target size (B, 6), with
    their own negative values;
  - classifier-free guidance when `guidance_scale > 1`, with a negative prompt; without one and
    with `force_zeros_for_empty_prompt` (model_index.json) the negative features are zeros;
  - any scheduler of `models.schedulers` but flow matching; a stochastic one (Euler ancestral,
    SDXL-Turbo's) draws each step's noise from per-image keys derived from the seed, so an image
    does not depend on the batch split over devices.

`loras=[(file, strength), ...]` applies SDXL LoRAs for one call (`pipelines.loras`): diffusers/PEFT
or kohya files, on the UNet (its linears, and its convs in 16 bits) and on the text encoders when
the file holds LoRAs of them.

SDXL-Turbo is the same pipeline with `guidance_scale=0` and 1 to 4 steps of Euler ancestral (or
Euler) with "trailing" timestep spacing, as its scheduler_config.json says.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.safetensors_io import CheckpointError
from models import schedulers
from models.clip import CLIPTextModel
from models.tokenizers import Tokenizer
from models.unet_sdxl import UNetSDXL
from models.vae import AutoencoderKL
from pipelines.base import TextToImagePipeline, load_components
from pipelines.folder import PipelineFolder, unet_size_multiple
from pipelines.inputs import check_call
from pipelines.loop import denoise, to_images
from pipelines.loras import LoRASpec
from svdq_jax.errors import InputError

PIPELINE_CLASS = "StableDiffusionXLPipeline"
DEFAULT_GUIDANCE_SCALE = 5.0  # diffusers' StableDiffusionXLPipeline default


def _pair(name: str, value: Any) -> tuple[int, int]:
  """A (height, width) or (top, left) pair of non-negative integers; InputError otherwise."""
  try:
    pair = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    pair = ()
  if len(pair) != 2 or any(v < 0 for v in pair):
    raise InputError(f"{PIPELINE_CLASS}: {name} must be two non-negative integers, got {value!r}")
  return pair


def _negative_prompts(negative_prompt: str | Sequence[str], count: int) -> list[str]:
  """One negative prompt per prompt: a single one is repeated; InputError on a count mismatch."""
  negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
  if not negatives or not all(isinstance(p, str) for p in negatives):
    raise InputError(f"{PIPELINE_CLASS}: negative_prompt must be a string or a non-empty list of "
                     f"strings, got {negative_prompt!r}")
  if len(negatives) == 1:
    negatives = negatives * count
  if len(negatives) != count:
    raise InputError(f"{PIPELINE_CLASS}: {len(negatives)} negative prompts for {count} prompts")
  return negatives


def _jit_text_features(encoder: CLIPTextModel) -> Callable[[Any, jax.Array], tuple]:
  """`(state, ids) -> (penultimate hidden state, text_embeds or None)` of a CLIP encoder, jitted
  with its parameters `state` (`nnx.state(encoder)`, or one with LoRAs applied) as an argument
  (`output_hidden_states` is static, so `jit_module` does not fit)."""
  graphdef, _ = nnx.split(encoder)

  @jax.jit
  def features(state, ids):
    out = nnx.merge(graphdef, state)(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds

  return features


def _jit_decode(vae: AutoencoderKL) -> Callable[[jax.Array], jax.Array]:
  """`latents (B, C, h, w) -> pixels (B, 3, H, W)`, jitted: undoes the latent scaling (per
  channel when the VAE's config has `latents_mean` / `latents_std`, as diffusers' SDXL pipeline)
  and decodes."""
  graphdef, state = nnx.split(vae)
  config = vae.config

  @jax.jit
  def decode(state, latents):
    model = nnx.merge(graphdef, state)
    if config.latents_mean is not None and config.latents_std is not None:
      mean = jnp.asarray(config.latents_mean, latents.dtype)[None, :, None, None]
      std = jnp.asarray(config.latents_std, latents.dtype)[None, :, None, None]
      raw = latents * std / config.scaling_factor + mean
    else:
      raw = model.unscale_latents(latents)
    return model.decode(raw)

  return lambda latents: decode(state, latents)


def micro_conditioning(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                       target_size: tuple[int, int]) -> np.ndarray:
  """SDXL's `time_ids` (6,) float32: original (h, w), crop (top, left), target (h, w)."""
  return np.array([*original_size, *crops_coords_top_left, *target_size], np.float32)


def sdxl_step_fn(unet: UNetSDXL, scheduler: schedulers.Scheduler, *, guided: bool,
                 eager: bool = False) -> Callable[..., Any]:
  """One SDXL denoising step as a pure function.

  Returns `step(state, schedule, i, (latents, scheduler_state), embeds, pooled, time_ids,
  neg_embeds, neg_pooled, neg_time_ids, guidance, noise_keys)`: latents (B, 4, h, w), embeds
  (B, T, 2048), pooled (B, 1280), time_ids (B, 6) and the negative ones (used when `guided`),
  guidance (B,), noise_keys (B,) PRNG keys (used by a stochastic scheduler, folded with the step
  index). `state` is `nnx.state(unet)`; `eager` runs the unet object itself (for `calibrate`).
  """
  graphdef, _ = nnx.split(unet)

  def step(state, schedule, i, carry, embeds, pooled, time_ids, neg_embeds, neg_pooled,
           neg_time_ids, guidance, noise_keys):
    model = unet if eager else nnx.merge(graphdef, state)
    x, scheduler_state = carry
    if guided:
      embeds = jnp.concatenate([neg_embeds, embeds])
      pooled = jnp.concatenate([neg_pooled, pooled])
      time_ids = jnp.concatenate([neg_time_ids, time_ids])
    x_in = jnp.concatenate([x, x]) if guided else x
    x_in = scheduler.scale_model_input(schedule, i, x_in)
    timestep = jnp.broadcast_to(schedule.timesteps[i], x_in.shape[:1])
    out = model(x_in, timestep, embeds, {"text_embeds": pooled, "time_ids": time_ids})
    if guided:
      uncond, cond = jnp.split(out, 2)
      out = uncond + guidance[:, None, None, None].astype(out.dtype) * (cond - uncond)
    if not scheduler.stochastic:
      return scheduler.step(schedule, scheduler_state, i, out, x)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:],
                                                 jnp.float32))(noise_keys)
    return scheduler.step(schedule, scheduler_state, i, out, x, noise=noise)

  return step


class StableDiffusionXLPipeline(TextToImagePipeline):
  """SDXL / SDXL-Turbo text-to-image: two CLIP encoders, the UNet, the 4-channel VAE.

  Args:
    unet: `models.unet_sdxl.UNetSDXL` (plain or quantized), with the "text_time" embedding.
    vae: `models.vae.AutoencoderKL` (SDXL's, scaling factor 0.13025).
    text_encoder: CLIP ViT-L `CLIPTextModel`; text_encoder_2: bigG `CLIPTextModel` with
      projection.
    tokenizer, tokenizer_2: their tokenizers (the second pads with "!" in SDXL's release).
    scheduler: a `models.schedulers` scheduler (not flow matching).
    force_zeros_for_empty_prompt: zero negative features when no negative prompt is given.

  Raises:
    InputError when the models do not fit together: no "text_time" embedding, a second encoder
    without projection, text widths or the pooled width that differ from what the UNet takes, or
    a flow-matching scheduler.
  """

  pipeline_class = PIPELINE_CLASS
  denoiser_name = "unet"
  lora_model = "sdxl"

  def __init__(self, unet: UNetSDXL, vae: AutoencoderKL, text_encoder: CLIPTextModel,
               text_encoder_2: CLIPTextModel, tokenizer: Tokenizer, tokenizer_2: Tokenizer,
               scheduler: schedulers.Scheduler, *, force_zeros_for_empty_prompt: bool = True):
    config = unet.config
    if config.addition_embed_type != "text_time":
      raise InputError(f"{PIPELINE_CLASS}: the unet has no 'text_time' addition embedding (an "
                       "SD 1.x / 2.x UNet?)")
    projection = text_encoder_2.config.projection_dim
    if projection is None:
      raise InputError(f"{PIPELINE_CLASS}: text_encoder_2 must have a text_projection "
                       "(CLIPTextModelWithProjection)")
    text_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if text_width != config.cross_attention_dim:
      raise InputError(f"{PIPELINE_CLASS}: the text encoders give {text_width} features, the "
                       f"unet's cross_attention_dim is {config.cross_attention_dim}")
    pooled_width = projection + 6 * config.addition_time_embed_dim
    if pooled_width != config.projection_class_embeddings_input_dim:
      raise InputError(f"{PIPELINE_CLASS}: projection_dim {projection} + 6 time ids x "
                       f"{config.addition_time_embed_dim} = {pooled_width}, the unet's "
                       "projection_class_embeddings_input_dim is "
                       f"{config.projection_class_embeddings_input_dim}")
    if isinstance(scheduler, schedulers.FlowMatchEulerScheduler):
      raise InputError(f"{PIPELINE_CLASS}: a flow-matching scheduler does not fit SDXL")
    self._init_shared(vae)
    self.unet = unet
    self.vae = vae
    self.text_encoder = text_encoder
    self.text_encoder_2 = text_encoder_2
    self.tokenizer = tokenizer
    self.tokenizer_2 = tokenizer_2
    self.scheduler = scheduler
    self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
    self._clip = _jit_text_features(text_encoder)
    self._clip_2 = _jit_text_features(text_encoder_2)
    self._decode = _jit_decode(vae)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike | PipelineFolder,
                      dtype: jnp.dtype | None = None) -> StableDiffusionXLPipeline:
    """Loads a diffusers `StableDiffusionXLPipeline` folder (SDXL, SDXL-Turbo), or ours of the
    same layout.

    path: the folder, or its `PipelineFolder` record when the caller has read it.
    dtype: computation and parameter dtype of every model (None: float32 for diffusers weights;
      a component already in our checkpoint format keeps its stored dtypes).
    """
    folder = cls.read_folder(path)
    path, scheduler = folder.path, folder.scheduler
    force_zeros = folder.model_index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(force_zeros, bool):
      raise CheckpointError(f"{path / 'model_index.json'}: force_zeros_for_empty_prompt must be "
                            f"true or false, got {force_zeros!r}")
    if isinstance(scheduler, schedulers.FlowMatchEulerScheduler):
      raise CheckpointError(f"{path}/scheduler: {PIPELINE_CLASS} needs a noise-prediction "
                            "scheduler (Euler, Euler ancestral, DPM-Solver), got "
                            f"{scheduler.class_name}")
    return cls(**load_components(
        folder, dtype, {"unet": UNetSDXL, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                        "text_encoder_2": CLIPTextModel}, ("tokenizer", "tokenizer_2")),
               scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros)

  size_multiple = staticmethod(unet_size_multiple)
  """`size_multiple(vae_config, unet_config)`: what height and width must be multiples of
  (`pipelines.folder.unet_size_multiple`: 32 for SDXL)."""

  @classmethod
  def check_call(cls, what: str, prompt: str | Sequence[str],
                 negative_prompt: str | Sequence[str] | None = None, *, height: int, width: int,
                 size_multiple: int, num_images_per_prompt: int = 1, output_type: str = "np"
                 ) -> list[str]:
    """The checks of `__call__` on prompts, sizes and outputs, without a loaded model; returns
    the prompts."""
    prompts = check_call(what, prompt, height=height, width=width, size_multiple=size_multiple,
                         num_images_per_prompt=num_images_per_prompt, output_type=output_type)
    if negative_prompt is not None:
      _negative_prompts(negative_prompt, len(prompts))
    return prompts

  def encode_prompt(self, prompts: Sequence[str], states: Sequence[Any] | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """(text features (B, T, D1 + D2), pooled projection (B, P)), as diffusers' `encode_prompt`
    without clip_skip: each encoder's penultimate hidden state, and bigG's `text_embeds`.
    `states`: the two encoders' parameters (default: their own; `__call__` passes them with its
    LoRAs applied)."""
    if states is None:
      states = (nnx.state(self.text_encoder), nnx.state(self.text_encoder_2))
    features = []
    for tokenizer, encoder, state, config in (
        (self.tokenizer, self._clip, states[0], self.text_encoder.config),
        (self.tokenizer_2, self._clip_2, states[1], self.text_encoder_2.config)):
      length = tokenizer.model_max_length or config.max_position_embeddings
      hidden, pooled = encoder(state, jnp.asarray(tokenizer(list(prompts), length).input_ids))
      features.append(hidden)
    return jnp.concatenate(features, axis=-1), pooled

  def __call__(self, prompt: str | Sequence[str],
               negative_prompt: str | Sequence[str] | None = None, *, height: int = 1024,
               width: int = 1024, num_inference_steps: int = 50,
               guidance_scale: float | None = None, seed: int | None = 0,
               key: jax.Array | None = None, num_images_per_prompt: int = 1,
               latents: jax.Array | None = None,
               original_size: tuple[int, int] | None = None,
               crops_coords_top_left: tuple[int, int] = (0, 0),
               target_size: tuple[int, int] | None = None,
               negative_original_size: tuple[int, int] | None = None,
               negative_crops_coords_top_left: tuple[int, int] = (0, 0),
               negative_target_size: tuple[int, int] | None = None,
               devices: int | None = None, progress: bool = False, output_type: str = "np",
               jit: bool = True, loras: Sequence[LoRASpec] | None = None) -> np.ndarray:
    """Generates images; arguments as `FluxPipeline.__call__`, and:

    Args:
      negative_prompt: the unconditional prompt(s) of classifier-free guidance (one, or one per
        prompt); None gives zero features with `force_zeros_for_empty_prompt` (SDXL's
        model_index.json), else "".
      height, width: image size, multiples of `size_multiple` (32 for SDXL); 1024 for SDXL,
        512 for SDXL-Turbo.
      num_inference_steps: 25-50 for SDXL, 1-4 for SDXL-Turbo.
      guidance_scale: classifier-free guidance (default 5.0; <= 1 turns it off, as SDXL-Turbo's
        0.0 does).
      latents: initial noise (B, 4, H/8, W/8); like diffusers, it is multiplied by the
        scheduler's initial noise sigma.
      original_size, crops_coords_top_left, target_size: the micro-conditioning (sizes default
        to (height, width)); negative_*: those of the unconditional branch, used (as in diffusers)
        only when both negative sizes are given; otherwise it gets the conditional branch's.
      loras: (LoRA file, strength) pairs applied for this call (`pipelines.loras`): diffusers/
        PEFT or kohya SDXL LoRAs, on the UNet and, where the file has them, the text encoders;
        None or [] samples from the base model.

    Returns:
      (B, height, width, 3) float32 in [0, 1], or the final latents (B, 4, h, w) for "latent".

    Raises:
      InputError for bad prompts, sizes, micro-conditioning, latents or output settings, or a
      LoRA file that is missing, of another model or format, or whose keys match no layer;
      NonFiniteError (`pipelines.loop`) when the latents or pixels turn NaN or inf.
    """
    prompts = self.check_call(
        PIPELINE_CLASS, prompt, negative_prompt, height=height, width=width,
        size_multiple=self.size_multiple(self.vae.config, self.unet.config),
        num_images_per_prompt=num_images_per_prompt, output_type=output_type)
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    guided = guidance_scale > 1.0
    size = (height, width)
    time_ids = micro_conditioning(_pair("original_size", original_size or size),
                                  _pair("crops_coords_top_left", crops_coords_top_left),
                                  _pair("target_size", target_size or size))
    neg_time_ids = time_ids
    if negative_original_size is not None and negative_target_size is not None:
      neg_time_ids = micro_conditioning(
          _pair("negative_original_size", negative_original_size),
          _pair("negative_crops_coords_top_left", negative_crops_coords_top_left),
          _pair("negative_target_size", negative_target_size))
    states = self._loras.states({"unet": self.unet, "text_encoder": self.text_encoder,
                                 "text_encoder_2": self.text_encoder_2}, loras, jit=jit)
    text_states = (states["text_encoder"], states["text_encoder_2"])
    embeds, pooled = self.encode_prompt(prompts, text_states)
    if not guided:  # the step ignores them; no second text-encoder run
      neg_embeds, neg_pooled = embeds, pooled
    elif negative_prompt is None and self.force_zeros_for_empty_prompt:
      neg_embeds, neg_pooled = jnp.zeros_like(embeds), jnp.zeros_like(pooled)
    else:
      neg_embeds, neg_pooled = self.encode_prompt(
          _negative_prompts(negative_prompt or "", len(prompts)), text_states)
    batch = len(prompts) * num_images_per_prompt
    repeat = functools.partial(jnp.repeat, repeats=num_images_per_prompt, axis=0)
    embeds, pooled, neg_embeds, neg_pooled = map(repeat, (embeds, pooled, neg_embeds, neg_pooled))
    dtype = embeds.dtype

    def tile(ids: np.ndarray) -> jax.Array:
      return jnp.tile(jnp.asarray(ids, dtype)[None], (batch, 1))

    shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
             width // self.vae_scale_factor)
    key = jax.random.key(seed or 0) if key is None else key
    if latents is None:
      latents = jax.random.normal(key, shape, jnp.float32)
    if tuple(latents.shape) != shape:
      raise InputError(f"{PIPELINE_CLASS}: latents must be {shape}, got {tuple(latents.shape)}")
    noise_keys = jax.random.split(jax.random.fold_in(key, 1), batch)
    schedule = self.scheduler.schedule(num_inference_steps)
    sigma = self.scheduler.init_noise_sigma(schedule)
    latents = (jnp.asarray(latents, jnp.float32) * sigma).astype(dtype)
    guidance = jnp.full((batch,), guidance_scale, jnp.float32)
    latents = denoise(
        lambda eager: sdxl_step_fn(self.unet, self.scheduler, guided=guided, eager=eager),
        self.scheduler, self._runners.setdefault(guided, {}), state=states["unet"],
        schedule=schedule, latents=latents,
        conditions=(embeds, pooled, tile(time_ids), neg_embeds, neg_pooled, tile(neg_time_ids),
                    guidance, noise_keys),
        condition_axes=(0,) * 8, devices=devices, progress=progress, jit=jit,
        denoiser="unet")
    if output_type == "latent":
      return np.asarray(latents)
    return to_images(self._decode(latents))

