"""FLUX.1 text-to-image (dev with its guidance embedding, schnell): CLIP pooled + T5 features,
flow-matching Euler, 16-channel VAE, the whole denoising loop in one jitted function.

Calling the pipeline tokenizes on the host and encodes the prompts with the jitted text encoders,
draws the initial latents from `jax.random.key(seed)` (or takes `latents`), runs the loop of
`pipelines.loop` and decodes with the jitted VAE into images (B, H, W, 3) float32 in [0, 1].
Same seed, same image: the noise is drawn for the whole batch on the host side of the mesh, so
the image does not depend on the device count, and runs on CPU repeat bit for bit.

Several devices (`devices`) or several processes (after `pipelines.distributed.initialize`):
every process tokenizes, encodes and draws the noise of the whole batch on its first device (the
text encoders cost little next to the denoising steps, and so the conditions do not depend on the
process count); the denoising loop and the VAE decoder then run data-parallel over the devices of
all processes, each device computing its rows of the batch. The images of a run therefore depend
on the rows per device (XLA's CPU kernels round batch 1 and batch 8 differently in the last
bits), not on how the devices are spread over processes. `gather=False` returns only the rows
this process computed (`models.sharding.process_rows`), without any cross-process transfer.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import loading
from convert.safetensors_io import CheckpointError
from models import schedulers, sharding
from models.clip import CLIPTextModel
from models.flux import FluxTransformer
from models.t5 import T5Encoder
from models.tokenizers import Tokenizer
from models.vae import AutoencoderKL
from pipelines.base import TextToImagePipeline, load_components
from pipelines.folder import PipelineFolder, flux_size_multiple
from pipelines.inputs import check_call
from pipelines.loop import denoise, jit_module, to_images
from pipelines.loras import LoRASpec
from svdq_jax.errors import InputError


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
  img_ids, txt_ids, *negative) -> (latents, scheduler_state)` where `state` is
  `nnx.state(transformer)` (plain or quantized), latents (B, S, 4C), prompt_embeds (B, T, D), pooled
  (B, P), guidance (B,) (unused without a guidance embedding), img_ids (S, 3), txt_ids (T, 3).
  `negative`, when given, is (negative_embeds (B, T, D), negative_pooled (B, P), true_cfg_scale
  (B,)): true classifier-free guidance as diffusers' `true_cfg_scale`, velocity = v_neg +
  scale * (v - v_neg), both halves in one batch of 2B. `eager` runs the transformer object itself,
  so that `calibrate` sees its kernels; `fused_loop(step, scheduler)` makes the whole loop.
  """
  graphdef, _ = nnx.split(transformer)
  guidance_embeds = bool(transformer.config.guidance_embeds)

  def step(state, schedule, i, carry, prompt_embeds, pooled, guidance, img_ids, txt_ids,
           *negative):
    model = transformer if eager else nnx.merge(graphdef, state)
    x, scheduler_state = carry
    batch = x.shape[0]
    inputs = x
    if negative:
      negative_embeds, negative_pooled, true_cfg_scale = negative
      inputs = jnp.concatenate([x, x])
      prompt_embeds = jnp.concatenate([prompt_embeds, negative_embeds])
      pooled = jnp.concatenate([pooled, negative_pooled])
      guidance = jnp.concatenate([guidance, guidance])
    timestep = jnp.broadcast_to(schedule.timesteps[i], inputs.shape[:1]).astype(x.dtype)
    velocity = model(hidden_states=inputs, encoder_hidden_states=prompt_embeds,
                     pooled_projections=pooled, timestep=timestep / 1000, img_ids=img_ids,
                     txt_ids=txt_ids, guidance=guidance if guidance_embeds else None)
    if negative:
      positive, negative_velocity = velocity[:batch], velocity[batch:]
      scale = true_cfg_scale.astype(velocity.dtype)[:, None, None]
      velocity = negative_velocity + scale * (positive - negative_velocity)
    return scheduler.step(schedule, scheduler_state, i, velocity, x)

  return step


class FluxPipeline(TextToImagePipeline):
  """FLUX.1 text-to-image: CLIP pooled + T5 features, flow-matching Euler, 16-channel VAE.

  Args:
    transformer: `models.flux.FluxTransformer` (plain or quantized).
    vae: `models.vae.AutoencoderKL`.
    text_encoder: `models.clip.CLIPTextModel` (pooled output).
    text_encoder_2: `models.t5.T5Encoder`.
    tokenizer, tokenizer_2: CLIP and T5 tokenizers.
    scheduler: `FlowMatchEulerScheduler` (dynamic shift for dev, none for schnell).
  """

  pipeline_class = "FluxPipeline"
  denoiser_name = "transformer"
  lora_model = "flux"

  def __init__(self, transformer: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module,
               text_encoder_2: nnx.Module, tokenizer: Tokenizer, tokenizer_2: Tokenizer,
               scheduler: schedulers.FlowMatchEulerScheduler):
    self._init_shared(vae)
    self.transformer = transformer
    self.vae = vae
    self.text_encoder = text_encoder
    self.text_encoder_2 = text_encoder_2
    self.tokenizer = tokenizer
    self.tokenizer_2 = tokenizer_2
    self.scheduler = scheduler
    self.guidance_embeds = bool(transformer.config.guidance_embeds)
    self._clip = jit_module(text_encoder)
    self._t5 = jit_module(text_encoder_2)
    self._decode = jit_module(vae, "decode")
    self._decoders: dict = {}  # data-parallel VAE decoders by device count

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike | PipelineFolder,
                      dtype: jnp.dtype | None = None, *, shard_weights: str | None = None,
                      devices: int | None = None) -> FluxPipeline:
    """Loads a diffusers `FluxPipeline` folder, or ours of the same layout.

    path: the folder, or its `PipelineFolder` record when the caller has read it.
    dtype: computation and parameter dtype of every model (None: float32 for diffusers weights;
      a component already in our checkpoint format keeps its stored dtypes).
    shard_weights: "fsdp" or "channels" reads the transformer's parameters straight onto their
      shardings over the first `devices` devices (`convert.loading.load_pretrained`), for a
      transformer larger than one device; sample with the same `shard_weights` and `devices`.
    """
    folder = cls.read_folder(path)
    scheduler = folder.scheduler
    if not isinstance(scheduler, schedulers.FlowMatchEulerScheduler):
      raise CheckpointError(f"{folder.path}/scheduler: FluxPipeline needs a "
                            f"FlowMatchEulerDiscreteScheduler, got {scheduler.class_name}")
    path = folder.path / "transformer"
    transformer = (FluxTransformer.from_pretrained(path, dtype=dtype) if shard_weights is None
                   else loading.load_pretrained(path, "flux", dtype, shard_weights=shard_weights,
                                                devices=devices))
    return cls(transformer, **load_components(
        folder, dtype, {"vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                        "text_encoder_2": T5Encoder}, ("tokenizer", "tokenizer_2")),
               scheduler=scheduler)

  def with_transformer(self, transformer: nnx.Module) -> FluxPipeline:
    """A pipeline with another transformer (e.g. a quantized copy of this one's) that shares this
    one's text encoders, VAE, tokenizers, scheduler and their compiled functions."""
    pipe = copy.copy(self)
    pipe.transformer = transformer
    pipe.guidance_embeds = bool(transformer.config.guidance_embeds)
    pipe._runners = {}
    return pipe

  size_multiple = staticmethod(flux_size_multiple)
  """`size_multiple(vae_config, transformer_config)`: what height and width must be multiples
  of (`pipelines.folder.flux_size_multiple`)."""

  @classmethod
  def check_call(cls, what: str, prompt: str | Sequence[str],
                 negative_prompt: str | Sequence[str] | None = None, *, height: int, width: int,
                 size_multiple: int, num_images_per_prompt: int = 1,
                 output_type: str = "np") -> list[str]:
    """The checks of `__call__` (its Raises), without a loaded model; returns the prompts."""
    prompts = check_call(what, prompt, height=height, width=width, size_multiple=size_multiple,
                         num_images_per_prompt=num_images_per_prompt, output_type=output_type)
    if negative_prompt is not None:
      negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
      if (not isinstance(negatives, Sequence) or len(negatives) not in (1, len(prompts))
          or not all(isinstance(p, str) for p in negatives)):
        raise InputError(f"{what}: negative_prompt must be a string or a list of "
                         f"{len(prompts)} strings (one per prompt)")
    return prompts

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

  def __call__(self, prompt: str | Sequence[str],
               negative_prompt: str | Sequence[str] | None = None, *,
               height: int = 1024, width: int = 1024, num_inference_steps: int = 28,
               guidance_scale: float | None = None, true_cfg_scale: float = 1.0,
               seed: int | None = 0,
               key: jax.Array | None = None, num_images_per_prompt: int = 1,
               latents: jax.Array | None = None, max_sequence_length: int = 512,
               devices: int | None = None, progress: bool = False,
               output_type: str = "np", jit: bool = True,
               loras: Sequence[LoRASpec] | None = None, shard_weights: str | None = None,
               gather: bool = True) -> np.ndarray:
    """Generates images.

    Args:
      prompt: one prompt or a list (the batch).
      negative_prompt: with true_cfg_scale > 1, true classifier-free guidance against this
        prompt ("" for the unconditional one), as diffusers' FluxPipeline; ignored otherwise.
      height, width: image size, multiples of 16 (the VAE factor times the 2x2 packing).
      num_inference_steps: denoising steps (dev: 28-50, schnell: 1-4).
      guidance_scale: the distilled guidance of FLUX.1-dev (default 3.5); ignored by schnell.
      true_cfg_scale: scale of true classifier-free guidance (two transformer passes per step);
        used when above 1 and a negative_prompt is given. A model trained with dropped prompts
        (the embedded demo model) needs it; FLUX.1-dev and schnell do not.
      seed / key: randomness of the initial latents (key wins when both are given).
      num_images_per_prompt: images per prompt; the batch is B = len(prompts) * this.
      latents: packed initial latents (B, h/2 * w/2, 4C) instead of drawn ones.
      max_sequence_length: T5 tokens (512 for dev, 256 is common for schnell).
      devices: run data-parallel over this many devices (None: one; with several processes,
        every device of every process).
      progress: show a progress bar of the steps (runs the compiled one-step body per step).
      output_type: "np" for images, "latent" for the final packed latents.
      jit: False runs the steps eagerly in Python, one model call at a time (for `calibrate`;
        slow, and without data parallelism).
      loras: (LoRA file, strength) pairs applied for this call (`pipelines.loras`): diffusers/
        PEFT, kohya or XLabs FLUX.1 LoRAs; None or [] samples from the base model.
      shard_weights: "fsdp" or "channels" splits the transformer's parameters (quantized ones
        included) over the `devices` (`models.sharding.weight_shardings`) instead of replicating
        them; None replicates. Runs the fused loop (no progress bar).
      gather: with several processes, return every image on every process (an all-gather);
        False returns only this process's rows, in `models.sharding.process_rows` order.

    Returns:
      (B, height, width, 3) float32 in [0, 1], or the packed latents for "latent" (with
      gather=False in a multi-process run, only this process's rows).

    Raises:
      InputError for a negative prompt that is not one string or one per prompt, an empty or
      non-string prompt, num_images_per_prompt
      below 1, an unknown output_type, a size that is not a positive multiple of
      `size_multiple`, latents of the wrong shape, or a LoRA file that is missing, of another
      model or of an unknown format (naming the file and its first unmatched keys).
    """
    count = sharding.sampling_device_count(devices)
    prompts = self.check_call(
        "FluxPipeline", prompt, negative_prompt, height=height, width=width,
        size_multiple=self.size_multiple(self.vae.config, self.transformer.config),
        num_images_per_prompt=num_images_per_prompt, output_type=output_type)
    state = self._loras.state(self.transformer, loras, jit=jit)
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
    conditions = (prompt_embeds, pooled, guidance, latent_image_ids(h, w), txt_ids)
    condition_axes = (0, 0, 0, None, None)
    if negative_prompt is not None and true_cfg_scale > 1:
      negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
      negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
      negative_embeds, negative_pooled = self.encode_prompt(
          negatives, max_sequence_length=max_sequence_length)
      conditions += (jnp.repeat(negative_embeds, num_images_per_prompt, axis=0),
                     jnp.repeat(negative_pooled, num_images_per_prompt, axis=0),
                     jnp.full((batch,), true_cfg_scale, jnp.float32))
      condition_axes += (0, 0, 0)
    latents = denoise(
        lambda eager: flux_step_fn(self.transformer, self.scheduler, eager=eager),
        self.scheduler, self._runners, state=state, schedule=schedule,
        latents=latents, conditions=conditions, condition_axes=condition_axes, devices=count,
        progress=progress, jit=jit, shard_weights=shard_weights)
    if output_type == "latent":
      return self._rows(latents, batch, count, gather)
    if count == 1:
      return to_images(self._decode(self.vae.unscale_latents(unpack_latents(latents, h, w))))
    return to_images(self._rows(self._decoder(count, h, w)(nnx.state(self.vae), latents),
                                batch, count, gather))

  def _decoder(self, count: int, h: int, w: int) -> Callable[..., jax.Array]:
    """`decode(vae_state, packed_latents) -> pixels (B, 3, H, W)` for an (h, w) latent grid,
    data-parallel over `count` devices, the batch kept padded and split (for
    `models.sharding.local_rows`)."""
    key = (count, h, w)
    if key not in self._decoders:
      graphdef = nnx.graphdef(self.vae)

      def decode(vae_state, packed):
        vae = nnx.merge(graphdef, vae_state)
        return vae.decode(vae.unscale_latents(unpack_latents(packed, h, w)))

      self._decoders[key] = sharding.data_parallel(decode, devices=count, in_axes=(None, 0),
                                                   trim=False)
    return self._decoders[key]

  @staticmethod
  def _rows(x: jax.Array, batch: int, count: int, gather: bool) -> np.ndarray:
    """The first `batch` rows of a (possibly padded, sharded) result as numpy: all of them, or
    with gather=False in a multi-process run this process's rows only."""
    if count == 1 or gather or jax.process_count() == 1:
      return sharding.to_host(x)[:batch]
    return sharding.local_rows(x, batch)
