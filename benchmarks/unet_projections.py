"""Can the UNet transformers' proj_in / proj_out (1x1 projections) join the 4-bit layers?

A small random SDXL-layout UNet (`UNetSDXL`, widths 64 and 128 so that INT4 groups of 64 fit) is
calibrated on random latents, timesteps and text features, then quantized with svdquant-int4 twice:
with the default scope (proj_in / proj_out 16-bit, as Nunchaku ships SDXL) and with the
projections quantized too. Printed: each projection's layer error (relative Frobenius error of its
output on the calibration activations), and the end-to-end error of the final latents of a
4-step Euler sampling run against the float UNet, for both scopes. Random weights have no
activation outliers, so these figures bound the cost of the projections on such a model only.

Usage: python -m benchmarks.unet_projections (from the repository root)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from models import schedulers
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig
from svdq_jax import QuantConfig, calibrate, quantize_params, svdq_dot
from svdq_jax.config import DEFAULT_SKIP
from svdq_jax.params import matches_any
from svdq_jax.tree import named_leaves

CONFIG = UNetSDXLConfig(
    sample_size=16, block_out_channels=(64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(1, 2), cross_attention_dim=128, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=32)
PROJECTIONS = ("*attentions/*/proj_in/*", "*attentions/*/proj_out/*")
STEPS = 4
BATCH = 2


def _conditions(seed: int) -> tuple[jax.Array, dict]:
  key_text, key_pooled = jax.random.split(jax.random.key(seed))
  text = jax.random.normal(key_text, (BATCH, 16, CONFIG.cross_attention_dim))
  added = {"text_embeds": jax.random.normal(key_pooled, (BATCH, 64)),
           "time_ids": jnp.tile(jnp.array([[1024.0, 1024, 0, 0, 1024, 1024]]), (BATCH, 1))}
  return text, added


def _sample(model: UNetSDXL, seed: int) -> jax.Array:
  """Final latents of a 4-step Euler run (SDXL's scheduler settings) from seed's noise."""
  scheduler = schedulers.EulerDiscreteScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
      timestep_spacing="leading", steps_offset=1)
  schedule = scheduler.schedule(STEPS)
  text, added = _conditions(seed)
  x = jax.random.normal(jax.random.key(seed + 100), (BATCH, 4, 16, 16))
  x = x * scheduler.init_noise_sigma(schedule)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x):
    unet = nnx.merge(graphdef, state)
    for i in range(STEPS):
      x_in = scheduler.scale_model_input(schedule, i, x)
      out = unet(x_in, schedule.timesteps[i], text, added)
      x, _ = scheduler.step(schedule, (), i, out, x)
    return x

  return run(state, x)


def _rel(a: jax.Array, b: jax.Array) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main() -> int:
  argparse.ArgumentParser(description="Layer and final-latent error of a random SDXL-style UNet "
                          "with proj_in/proj_out kept 16-bit (default) or made INT4.").parse_args()
  model = UNetSDXL(CONFIG, rngs=nnx.Rngs(0))
  state = nnx.state(model)

  def run(seed: int) -> None:
    text, added = _conditions(seed)
    x = jax.random.normal(jax.random.key(seed + 200), (BATCH, 4, 16, 16))
    model(x, jnp.array([999.0, 500.0]) - 100 * seed, text, added)

  stats = calibrate(run, [0, 1, 2], model=model, progress=False)
  reference = _sample(model, 7)
  default = QuantConfig.preset("svdquant-int4")
  joined = dataclasses.replace(default,
                               skip=tuple(p for p in DEFAULT_SKIP if p not in PROJECTIONS))
  print(f"# random UNetSDXL {CONFIG.block_out_channels}, svdquant-int4 (g64, rank 32), "
        f"calibration: 3 UNet calls x {BATCH} latents of 16x16")
  results = {}
  for name, config in (("default (proj 16-bit)", default), ("proj_in/out INT4", joined)):
    quantized = quantize_params(state, stats, config, progress=False)
    layers = dict(named_leaves(quantized))
    if name != "default (proj 16-bit)":
      print(f"{'projection layer':58s}{'layer rel. error':>18s}")
      for path, kernel in named_leaves(state):
        if path.endswith("kernel") and matches_any(path, PROJECTIONS) and path in stats:
          samples = jnp.asarray(stats[path].samples)
          error = _rel(svdq_dot(samples, layers[path], impl="xla"), samples @ kernel)
          print(f"{path:58s}{error:18.4f}")
    copy = nnx.merge(nnx.graphdef(model), quantized)
    results[name] = _rel(_sample(copy, 7), reference)
  print(f"{'scope':24s}{'final latents rel. error vs float (4 Euler steps)':>52s}")
  for name, error in results.items():
    print(f"{name:24s}{error:52.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
