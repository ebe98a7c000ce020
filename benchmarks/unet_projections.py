"""Can the UNet transformers' proj_in / proj_out (1x1 projections) join the 4-bit layers?

A small random SDXL-layout UNet (`UNetSDXL`, widths 64 and 128 so that INT4 groups of 64 fit) is
calibrated on random latents, timesteps and text features, then quantized with svdquant-int4 in
two scopes: the default (proj_in / proj_out 16-bit, as Nunchaku ships SDXL) and with the
projections quantized too. Each layer's quantization does not depend on the others, so the
layers are quantized once in the wider scope and the default scope is that state with the
projections put back in float.

Printed: the layer error (relative Frobenius error of the layer's output on its calibration
activations) of each projection next to that of the layers the default scope quantizes, and the
end-to-end error against the float UNet of a 4-step Euler run (SDXL's scheduler settings, CFG
off): of the final latents, and of the images a small random VAE decodes from them (relative
error of the pixels and PSNR of the [0, 1] images). Random weights have no activation outliers,
so these figures say how much the projections add on such a model, not on SDXL's trained
weights.

Usage: python benchmarks/unet_projections.py [--seeds N] (from the repository root)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import schedulers
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig
from models.vae import AutoencoderKL, VAEConfig
from svdq_jax import QuantConfig, calibrate, is_quantized, quantize_params, svdq_dot
from svdq_jax.config import DEFAULT_SKIP
from svdq_jax.params import matches_any
from svdq_jax.tree import map_named_leaves, named_leaves

CONFIG = UNetSDXLConfig(
    sample_size=16, block_out_channels=(64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(1, 2), cross_attention_dim=128, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=32)
VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, scaling_factor=0.13025)
PROJECTIONS = ("*attentions/*/proj_in/*", "*attentions/*/proj_out/*")
STEPS = 4
BATCH = 2
LATENT = 16  # latent height and width; the VAE doubles them


def _conditions(seed: int) -> tuple[jax.Array, dict]:
  key_text, key_pooled = jax.random.split(jax.random.key(seed))
  text = jax.random.normal(key_text, (BATCH, 16, CONFIG.cross_attention_dim))
  added = {"text_embeds": jax.random.normal(key_pooled, (BATCH, 64)),
           "time_ids": jnp.tile(jnp.array([[1024.0, 1024, 0, 0, 1024, 1024]]), (BATCH, 1))}
  return text, added


def _sampler(model: UNetSDXL):
  """`run(state, seed) -> final latents` of a 4-step Euler run from seed's noise, jitted."""
  scheduler = schedulers.EulerDiscreteScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
      timestep_spacing="leading", steps_offset=1)
  schedule = scheduler.schedule(STEPS)
  graphdef = nnx.graphdef(model)

  @jax.jit
  def run(state, x, text, added):
    unet = nnx.merge(graphdef, state)
    x = x * scheduler.init_noise_sigma(schedule)
    for i in range(STEPS):
      out = unet(scheduler.scale_model_input(schedule, i, x), schedule.timesteps[i], text, added)
      x, _ = scheduler.step(schedule, (), i, out, x)
    return x

  def sample(state, seed: int) -> jax.Array:
    x = jax.random.normal(jax.random.key(seed + 100), (BATCH, 4, LATENT, LATENT))
    return run(state, x, *_conditions(seed))

  return sample


def _rel(a: jax.Array, b: jax.Array) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _psnr(images: np.ndarray, reference: np.ndarray) -> float:
  return float(10 * np.log10(1.0 / np.mean((images - reference) ** 2)))


def main() -> int:
  parser = argparse.ArgumentParser(description="Layer, final-latent and image error of a random "
                                   "SDXL-style UNet with proj_in/proj_out kept 16-bit (default) "
                                   "or made INT4.")
  parser.add_argument("--seeds", type=int, default=2, help="sampling runs (seeds) to average")
  args = parser.parse_args()
  start = time.perf_counter()
  model = UNetSDXL(CONFIG, rngs=nnx.Rngs(0))
  vae = AutoencoderKL(VAE, rngs=nnx.Rngs(1))
  state = nnx.state(model)

  def run(seed: int) -> None:
    text, added = _conditions(seed)
    x = jax.random.normal(jax.random.key(seed + 200), (BATCH, 4, LATENT, LATENT))
    model(x, jnp.array([999.0, 500.0]) - 100 * seed, text, added)

  stats = calibrate(run, [0, 1, 2], model=model, progress=False)
  default = QuantConfig.preset("svdquant-int4")
  joined = dataclasses.replace(default, skip=tuple(p for p in DEFAULT_SKIP if p not in PROJECTIONS))
  wide = quantize_params(state, stats, joined, progress=False)
  floats = dict(named_leaves(state))
  narrow = map_named_leaves(
      lambda path, leaf: floats[path] if matches_any(path, PROJECTIONS) else leaf, wide)

  print(f"# unet_projections: jax {jax.__version__} on {jax.default_backend()} "
        f"({platform.machine()}); random UNetSDXL {CONFIG.block_out_channels}, transformer "
        f"depths {CONFIG.transformer_layers_per_block}, svdquant-int4 (g64, rank 32)")
  print(f"# calibration: 3 UNet calls x {BATCH} latents of {LATENT}x{LATENT}, 16 text tokens")
  errors = {}
  for path, leaf in named_leaves(wide):
    if is_quantized(leaf):
      samples = jnp.asarray(stats[path].samples)
      errors[path] = _rel(svdq_dot(samples, leaf, impl="xla"), samples @ floats[path])
  projections = {p: e for p, e in errors.items() if matches_any(p, PROJECTIONS)}
  others = [e for p, e in errors.items() if p not in projections]
  print(f"\n{'layer':62s}{'rel. error':>12s}")
  for path, error in projections.items():
    print(f"{path.removesuffix('/kernel'):62s}{error:12.4f}")
  print(f"{f'the {len(others)} layers of the default scope: median':62s}"
        f"{np.median(others):12.4f}")
  print(f"{'                                           min .. max':62s}"
        f"{min(others):.4f} .. {max(others):.4f}")

  sample = _sampler(model)
  graphdef = nnx.graphdef(vae)
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z / VAE.scaling_factor))
  vae_state = nnx.state(vae)
  results: dict[str, list[tuple[float, float, float]]] = {"default (proj 16-bit)": [],
                                                         "proj_in/out INT4": []}
  for seed in range(args.seeds):
    latents = sample(state, seed)
    pixels = decode(vae_state, latents)
    images = np.clip(np.asarray(pixels) / 2 + 0.5, 0, 1)
    for name, quantized in zip(results, (narrow, wide), strict=True):
      q_latents = sample(quantized, seed)
      q_pixels = decode(vae_state, q_latents)
      q_images = np.clip(np.asarray(q_pixels) / 2 + 0.5, 0, 1)
      results[name].append((_rel(q_latents, latents), _rel(q_pixels, pixels),
                            _psnr(q_images, images)))
  print(f"\nend to end, {STEPS} Euler steps, mean of {args.seeds} seeds x {BATCH} images "
        f"({2 * LATENT}x{2 * LATENT} pixels through a random VAE {VAE.block_out_channels}):")
  print(f"{'scope':24s}{'latents rel. error':>20s}{'pixels rel. error':>20s}{'PSNR dB':>10s}")
  for name, rows in results.items():
    latent_err, pixel_err, psnr = np.mean(rows, axis=0)
    print(f"{name:24s}{latent_err:20.4f}{pixel_err:20.4f}{psnr:10.1f}")
  print(f"\n# {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
