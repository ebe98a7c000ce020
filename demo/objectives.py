"""Training losses of the demo model as pure functions of parameters.

VAE: L1 + squared error of the reconstruction from the noised posterior mean, plus a small
penalty on the latents' scale.
Denoiser: FLUX's rectified-flow objective (`pipelines.flow_matching`), the transformer run on
the text encoders' features of the prompts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pipelines.flow_matching import flow_matching_loss
from pipelines.flux import latent_image_ids, pack_latents

LATENT_NOISE = 0.1  # std of the noise added to the VAE latents in training


def vae_loss_fn(graphdef: nnx.GraphDef, latent_weight: float,
                noise_std: float = LATENT_NOISE) -> Callable[..., jax.Array]:
  """`loss(params, images (B, 3, H, W) in [-1, 1], key) -> scalar` for the VAE.

  A regularised autoencoder: the decoder reconstructs from the posterior mean plus Gaussian noise
  of std `noise_std` (robustness to the denoiser's errors), and `latent_weight` times the mean
  square of the latents keeps their scale bounded. The posterior's own variance is not trained:
  sampling from a unit-variance posterior at the start drowns the colours, which a few hundred
  steps do not recover (every emoji came out brown).
  """

  def loss(params, images, key):
    vae = nnx.merge(graphdef, params)
    mean = vae.encode(images).mean
    recon = vae.decode(mean + noise_std * jax.random.normal(key, mean.shape, mean.dtype))
    err = recon - images
    return jnp.abs(err).mean() + jnp.square(err).mean() + latent_weight * jnp.square(mean).mean()

  return loss


def encode_text(modules: dict, clip_ids: jax.Array, t5_ids: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """(T5 features (B, T, D), CLIP pooled (B, P)), as FluxPipeline encodes prompts (no masks)."""
  pooled = modules["text_encoder"](clip_ids).pooler_output
  return modules["text_encoder_2"](t5_ids), pooled


def velocity(modules: dict, x_t: jax.Array, t: jax.Array, prompt_embeds: jax.Array,
             pooled: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
  """The transformer's velocity for packed latents x_t (B, S, 4C) at noise levels t (B,)."""
  txt_ids = jnp.zeros((prompt_embeds.shape[1], 3), jnp.float32)
  return modules["transformer"](hidden_states=x_t, encoder_hidden_states=prompt_embeds,
                                pooled_projections=pooled, timestep=t,
                                img_ids=latent_image_ids(*latent_hw), txt_ids=txt_ids)


def flow_loss_fn(graphdefs: dict[str, nnx.GraphDef]) -> Callable[..., jax.Array]:
  """`loss(params, latents (B, C, h, w), clip_ids (B, T), t5_ids (B, T), key) -> scalar`.

  `params` maps each of transformer, text_encoder, text_encoder_2 to its parameter state;
  latents are already scaled (`AutoencoderKL.scale_latents`).
  """

  def loss(params, latents, clip_ids, t5_ids, key):
    modules = {name: nnx.merge(graphdefs[name], params[name]) for name in graphdefs}
    prompt_embeds, pooled = encode_text(modules, clip_ids, t5_ids)
    return flow_matching_loss(
        lambda x_t, t: velocity(modules, x_t, t, prompt_embeds, pooled, latents.shape[2:]),
        pack_latents(latents), key)

  return loss
