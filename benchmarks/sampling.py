"""Times FLUX sampling with the pipeline's jitted denoising loop: float against quantized.

    python benchmarks/sampling.py                        # tiny FLUX, CPU-sized, 1 device
    python benchmarks/sampling.py --cpu-devices 4 --devices 1 2 4
    python benchmarks/sampling.py --shapes flux-dev      # FLUX.1-dev at 1024x1024 (GPU)
    python benchmarks/sampling.py --progress-overhead    # host callback vs per-step body

Rows per (weights, device count): time to the first result (trace + compile + one run of the
whole loop) and the per-step time of the compiled loop (median of `--repeats` runs / steps).
Weights are random (speed does not depend on their values). The quantized model is quantized
data-free with `QuantConfig.preset(name, smooth=None)`: smoothing changes values, not shapes or
kernels, so the timing is that of the calibrated model. `--shapes flux-dev` builds the real
FLUX.1-dev transformer (12 B parameters, 4096 image + 512 text tokens per image) in bfloat16; it
needs a GPU with about 40 GB free. Nothing is printed that was not measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from models import schedulers, sharding
from models.flux import FluxConfig, FluxTransformer
from pipelines.flux import flux_step_fn, latent_image_ids
from pipelines.loop import fused_loop
from svdq_jax import QuantConfig, quantize_model


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", choices=("tiny", "small", "flux-dev"), default="tiny",
                      help="tiny: width 64, 2+2 blocks, 256 image tokens; small: width 768, "
                      "2+4 blocks, 1024 image tokens; flux-dev: the real model at 1024x1024")
  parser.add_argument("--presets", nargs="+", default=["float", "svdquant-int4"],
                      help="'float' and/or QuantConfig preset names")
  parser.add_argument("--devices", type=int, nargs="+", default=[1],
                      help="data-parallel device counts to time (batch = --batch x devices)")
  parser.add_argument("--batch", type=int, default=1, help="images per device")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="virtual CPU devices (set before jax starts)")
  parser.add_argument("--progress-overhead", action="store_true",
                      help="compare the progress-bar strategies instead")
  return parser.parse_args()


def _config(shapes: str):

  if shapes == "flux-dev":
    return FluxConfig.dev(), 4096, 512
  if shapes == "small":
    return FluxConfig.from_dict({**FluxConfig.dev().to_dict(), "num_layers": 2,
                                 "num_single_layers": 4, "num_attention_heads": 6}), 1024, 128
  return FluxConfig.from_dict({**FluxConfig.dev().to_dict(), "num_layers": 2,
                               "num_single_layers": 2, "num_attention_heads": 1,
                               "attention_head_dim": 64, "axes_dims_rope": (8, 28, 28),
                               "joint_attention_dim": 64, "pooled_projection_dim": 64}), 256, 32


def _inputs(config, image_tokens: int, text_tokens: int, batch: int, dtype):


  keys = jax.random.split(jax.random.key(0), 3)
  side = int(round(image_tokens ** 0.5)) * 2
  return dict(
      latents=jax.random.normal(keys[0], (batch, image_tokens, config.in_channels), dtype),
      prompt_embeds=jax.random.normal(keys[1], (batch, text_tokens, config.joint_attention_dim),
                                      dtype),
      pooled=jax.random.normal(keys[2], (batch, config.pooled_projection_dim), dtype),
      guidance=jnp.full((batch,), 3.5, jnp.float32),
      img_ids=latent_image_ids(side, side),
      txt_ids=jnp.zeros((text_tokens, 3), jnp.float32))


def _build(config, preset: str, dtype):
  """A random-init FluxTransformer of `config`, quantized data-free unless preset is 'float'."""


  model = FluxTransformer(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  if preset != "float":

    quant = QuantConfig.preset(preset, smooth=None)
    quantize_model(model, None, quant, progress=True)
  return model


def _setup(args: argparse.Namespace, steps: int):
  """(config, image tokens, text tokens, dtype, scheduler, schedule) for `args.shapes`; the dtype
  is bfloat16 on a GPU, float32 elsewhere."""


  config, image_tokens, text_tokens = _config(args.shapes)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  scheduler = schedulers.FlowMatchEulerScheduler(use_dynamic_shifting=True, shift=3.0)
  schedule = scheduler.schedule(steps, image_seq_len=image_tokens)
  return config, image_tokens, text_tokens, dtype, scheduler, schedule


def _time(fn, args, steps: int, repeats: int) -> tuple[float, float]:
  """(seconds to the first result, median seconds per step of later runs)."""
  start = time.perf_counter()
  fn(*args).block_until_ready()
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args).block_until_ready()
    runs.append((time.perf_counter() - start) / steps)
  return first, statistics.median(runs)


def run_table(args: argparse.Namespace) -> None:
  """Prints the first-result and per-step times per (weights, device count)."""


  config, image_tokens, text_tokens, dtype, scheduler, schedule = _setup(args, args.steps)
  print(f"# {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"shapes={args.shapes}, {image_tokens}+{text_tokens} tokens, {args.steps} steps, "
        f"{jnp.dtype(dtype).name}, batch {args.batch}/device")
  print(f"{'weights':<16}{'devices':>8}{'batch':>7}{'first result s':>16}{'per step ms':>13}")
  per_step: dict[tuple[str, int], float] = {}
  for preset in args.presets:
    model = _build(config, preset, dtype)
    denoise = fused_loop(flux_step_fn(model, scheduler), scheduler)
    state = nnx.state(model)
    for count in args.devices:
      batch = args.batch * count
      inputs = _inputs(config, image_tokens, text_tokens, batch, dtype)
      call_args = (state, schedule, inputs["latents"], inputs["prompt_embeds"], inputs["pooled"],
                   inputs["guidance"], inputs["img_ids"], inputs["txt_ids"])
      fn = (jax.jit(denoise) if count == 1 else sharding.data_parallel(
          denoise, devices=count, in_axes=(None, None, 0, 0, 0, 0, None, None)))
      first, step = _time(fn, call_args, args.steps, args.repeats)
      per_step[preset, count] = step
      print(f"{preset:<16}{count:>8}{batch:>7}{first:>16.2f}{step * 1e3:>13.2f}", flush=True)
    del model, state
  if "float" in args.presets:
    for (preset, count), step in per_step.items():
      if preset != "float":
        print(f"# speed-up of {preset} over float on {count} device(s): "
              f"{per_step['float', count] / step:.2f}x")


def run_progress_overhead(args: argparse.Namespace) -> None:
  """Per-step cost of the three ways to show progress, on the same loop."""


  steps = max(args.steps, 8)
  config, image_tokens, text_tokens, dtype, scheduler, schedule = _setup(args, steps)
  model = _build(config, "float", dtype)
  state = nnx.state(model)
  x = _inputs(config, image_tokens, text_tokens, args.batch, dtype)
  conditions = (x["prompt_embeds"], x["pooled"], x["guidance"], x["img_ids"], x["txt_ids"])
  bar = tqdm(total=steps, disable=True)
  step = flux_step_fn(model, scheduler)

  def step_with_callback(state, schedule, i, carry, *conditions):
    carry = step(state, schedule, i, carry, *conditions)
    jax.debug.callback(lambda i: bar.update(int(i) + 1 - bar.n), i)
    return carry

  fused = jax.jit(fused_loop(step, scheduler))
  fused_callback = jax.jit(fused_loop(step_with_callback, scheduler))
  one_step = jax.jit(step)

  def per_step_loop(state, schedule, latents, *conditions):
    carry = (latents, scheduler.init_state(latents))
    for i in range(steps):
      carry = jax.block_until_ready(one_step(state, schedule, jnp.int32(i), carry, *conditions))
      bar.update(1)
    return carry[0]

  print(f"# progress-bar strategies, {jax.devices()[0].device_kind}, shapes={args.shapes}, "
        f"{steps} steps, median of {args.repeats}")
  results = {}
  for name, fn in (("fused loop, no bar", fused), ("fused loop + debug.callback", fused_callback),
                   ("per-step jit body + sync", per_step_loop)):
    first, per = _time(fn, (state, schedule, x["latents"], *conditions), steps, args.repeats)
    results[name] = per
    print(f"{name:<30} first {first:7.2f} s   {per * 1e3:9.3f} ms/step", flush=True)
  base = results["fused loop, no bar"]
  for name, per in results.items():
    print(f"# {name}: {(per - base) * 1e3:+.3f} ms/step against no bar")


def main() -> int:
  args = _parse()
  if args.cpu_devices:

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.progress_overhead:
    run_progress_overhead(args)
  else:
    run_table(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
