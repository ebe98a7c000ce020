"""PixArt-Sigma text-to-image: T5 features with a mask, DPM-Solver++ (or Euler), 4-channel VAE,
classifier-free guidance, the whole denoising loop in one jitted function (`pipelines.loop`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import schedulers
from models.pixart import PixArtSigmaTransformer
from models.t5 import T5Encoder
from models.tokenizers import Tokenizer
from models.vae import AutoencoderKL
from pipelines.base import TextToImagePipeline, load_components
from pipelines.folder import PipelineFolder, pixart_size_multiple
from pipelines.inputs import check_call
from pipelines.loop import denoise, jit_module, to_images
from pipelines.loras import LoRASpec
from svdq_jax.errors import InputError


class PixArtSigmaPipeline(TextToImagePipeline):
  """PixArt-Sigma text-to-image: T5 features with a mask, DPM-Solver++ (or Euler), 4-channel VAE,
  classifier-free guidance when guidance_scale > 1.

  Prompts are lowercased and stripped (diffusers' `clean_caption=False` path); no resolution
  binning: the image has exactly the requested size.
  """

  pipeline_class = "PixArtSigmaPipeline"
  denoiser_name = "transformer"
  lora_model = "pixart"

  def __init__(self, transformer: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module,
               tokenizer: Tokenizer, scheduler: schedulers.Scheduler):
    self._init_shared(vae)
    self.transformer = transformer
    self.vae = vae
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.scheduler = scheduler
    self._t5 = jit_module(text_encoder)
    self._decode = jit_module(vae, "decode")

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike | PipelineFolder,
                      dtype: jnp.dtype | None = None) -> PixArtSigmaPipeline:
    """Loads a diffusers `PixArtSigmaPipeline` folder, or ours of the same layout.

    path: the folder, or its `PipelineFolder` record when the caller has read it.
    dtype: computation and parameter dtype of every model (None: float32 for diffusers weights;
      a component already in our checkpoint format keeps its stored dtypes).
    """
    folder = cls.read_folder(path)
    return cls(**load_components(
        folder, dtype, {"transformer": PixArtSigmaTransformer, "vae": AutoencoderKL,
                        "text_encoder": T5Encoder}, ("tokenizer",)), scheduler=folder.scheduler)

  size_multiple = staticmethod(pixart_size_multiple)
  """`size_multiple(vae_config, transformer_config)`: what height and width must be multiples
  of (`pipelines.folder.pixart_size_multiple`)."""

  @classmethod
  def check_call(cls, what: str, prompt: str | Sequence[str], negative_prompt: str | None = None,
                 *, height: int, width: int, size_multiple: int, num_images_per_prompt: int = 1,
                 output_type: str = "np") -> list[str]:
    """The checks of `__call__`, without a loaded model; returns the prompts."""
    return check_call(what, prompt, height=height, width=width, size_multiple=size_multiple,
                      num_images_per_prompt=num_images_per_prompt, output_type=output_type)

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
               output_type: str = "np", jit: bool = True,
               loras: Sequence[LoRASpec] | None = None) -> np.ndarray:
    """Generates images; arguments as `FluxPipeline.__call__`, and:

    Args:
      negative_prompt: the unconditional prompt of classifier-free guidance (default "").
      guidance_scale: classifier-free guidance (default 4.5; <= 1 turns guidance off).
      latents: initial noise (B, 4, H/8, W/8); like diffusers, it is multiplied by the
        scheduler's initial noise sigma.
      loras: (LoRA file, strength) pairs, diffusers/PEFT or kohya PixArt-Sigma LoRAs.
    """
    prompts = self.check_call(
        "PixArtSigmaPipeline", prompt, negative_prompt, height=height, width=width,
        size_multiple=self.size_multiple(self.vae.config, self.transformer.config),
        num_images_per_prompt=num_images_per_prompt, output_type=output_type)
    state = self._loras.state(self.transformer, loras, jit=jit)
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
    latents = denoise(
        lambda eager: self._step_fn(guided, eager), self.scheduler,
        self._runners.setdefault(guided, {}), state=state,
        schedule=schedule, latents=latents,
        conditions=(embeds, mask, neg_embeds, neg_mask, guidance),
        condition_axes=(0, 0, 0, 0, 0), devices=devices, progress=progress, jit=jit)
    if output_type == "latent":
      return np.asarray(latents)
    return to_images(self._decode(self.vae.unscale_latents(latents)))
