"""Time and peak memory to calibrate and quantize one real-width FLUX.1 block, whole-model style
and streamed (`svdq-jax quantize --stream`), extrapolated to FLUX.1's 19 double + 38 single blocks.

The block has FLUX.1's width (3072, 24 heads of 128, MLP 12288) and random weights (std 0.02,
with 1% of the input channels scaled by 10, as outlier channels); it is written as a bf16
diffusers safetensors file first (not timed). Its calibration inputs are `--runs` x `--steps`
samples of `--image-tokens` image and `--text-tokens` text tokens, with outlier channels too.

Modes, per block (each in a fresh subprocess, so peak resident memory is its own):
  whole   what `quantize_pipeline` does for each block: the block loaded from the file in the
          calibration dtype, `svdq_jax.calibrate` over every sample, `quantize_params`.
  stream  what `--stream` does for each block: the trajectory pass (the block read once per step
          and applied to that step's samples), then the block read again and
          `pipelines.quantize_stream.calibrate_quantize_block` (record, quantize, copy to host).

`--devices N` spreads the block's linears over the first N local devices (`quantize_params`'s
`devices`; default 1); the calibration forwards stay on the first.

Reported: wall time, peak resident memory of the process (ru_maxrss), on an accelerator the peak
device memory of the fullest device used (`memory_stats()["peak_bytes_in_use"]`), and the bytes of
the block's float weights and calibration statistics. Extrapolation to the 57 blocks: time 19
t_double + 38 t_single (the part outside the blocks and the text encoders are not counted); peak
memory, whole model: all 57 blocks' float weights + the statistics of all their layers (calibrate
records every layer before any is quantized) + the largest per-block working set beyond its weights;
streamed: the largest measured per-block peak + the 57 quantized blocks kept until the end + the
activation cache (runs x steps x tokens x width, float32).

Usage: python benchmarks/quantize_cost.py [--platform cpu|gpu] [--runs 2 --steps 2]
         [--image-tokens 512 --text-tokens 256] [--preset svdquant-int4] [--dtype float32]
         [--devices 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

import svdq_jax
from convert import flux as flux_converter
from convert.safetensors_io import CheckpointReader, save_file
from models.flux import FluxConfig, rope_frequencies
from pipelines.flux import latent_image_ids
from pipelines.quantize_stream import (
  DOUBLE,
  MAX_SAMPLES,
  SINGLE,
  BlockReader,
  calibrate_quantize_block,
)

KINDS = ("double", "single")
MODES = ("whole", "stream")
COUNTS = {"double": 19, "single": 38}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the runs (cpu, cuda)")
  parser.add_argument("--runs", type=int, default=2, help="calibration runs (prompts)")
  parser.add_argument("--steps", type=int, default=2, help="denoising steps per run")
  parser.add_argument("--image-tokens", type=int, default=512)
  parser.add_argument("--text-tokens", type=int, default=256)
  parser.add_argument("--heads", type=int, default=24,
                      help="attention heads of 128 (24: FLUX.1's width 3072; fewer for a check)")
  parser.add_argument("--preset", default="svdquant-int4")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="calibration dtype (quantize_pipeline's default is float32)")
  parser.add_argument("--devices", type=int, default=1,
                      help="local devices the linears are quantized on (default 1)")
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--worker", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
  return parser


def _write_block(path: Path, kind: str, config, dtype) -> None:
  """A random real-width block as a diffusers bf16 safetensors file (keys `<kind>.0.*`)."""
  rng = np.random.default_rng(0)
  keys = (flux_converter.double_block_keys(config, "transformer_blocks.0") if kind == "double"
          else flux_converter.single_block_keys(config, "single_transformer_blocks.0"))
  tensors = {}
  for key, entry in keys.items():
    if entry.transpose:  # torch (out, in): outlier input channels are columns
      w = rng.standard_normal(entry.shape, np.float32) * 0.02
      outliers = rng.choice(entry.shape[1], max(1, entry.shape[1] // 100), replace=False)
      w[:, outliers] *= 10
    elif key.endswith("bias"):
      w = rng.standard_normal(entry.shape, np.float32) * 0.01
    else:  # RMS norm scales
      w = 1 + rng.standard_normal(entry.shape, np.float32) * 0.05
    tensors[key] = w.astype(ml_dtypes.bfloat16)
  save_file(tensors, path)


def _samples(args, config, dtype) -> list[list]:
  """runs x steps block inputs [hidden (1, S, D), encoder_hidden (1, T, D), temb (1, D), rotary]."""
  d = config.inner_dim
  side = 1
  while side * side * 2 < args.image_tokens:
    side *= 2
  h, w = 2 * side, 2 * (args.image_tokens // side)  # packed grid of h/2 x w/2 tokens
  img_ids = latent_image_ids(h, w)
  ids = jnp.concatenate([jnp.zeros((args.text_tokens, 3), jnp.float32), img_ids])
  rotary = rope_frequencies(ids, config.axes_dims_rope, config.rope_theta)
  outliers = jnp.zeros((d,)).at[jnp.arange(0, d, 97)].set(20.0) + 1.0
  out = []
  for i in range(args.runs * args.steps):
    k1, k2, k3 = jax.random.split(jax.random.key(i), 3)
    hidden = jax.random.normal(k1, (1, img_ids.shape[0], d), jnp.float32) * outliers
    text = jax.random.normal(k2, (1, args.text_tokens, d), jnp.float32) * outliers
    temb = jax.random.normal(k3, (1, d), jnp.float32)
    out.append([hidden.astype(dtype), text.astype(dtype), temb.astype(dtype), rotary])
  return out


def _stats_bytes(file: Path, rows: int) -> int:
  """Bytes of the `ActivationStats` of every linear of the block in `file`: a (min(rows, 256), K)
  float32 sample and two (K,) vectors per linear (every linear sees all tokens, as in a double
  block's attention inputs; an upper bound for the stream-specific ones)."""
  with CheckpointReader(file) as reader:
    ks = [reader.shape(k)[1] for k in reader.keys()
          if k.endswith(".weight") and len(reader.shape(k)) == 2]
  return sum((min(rows, MAX_SAMPLES) + 2) * k * 4 for k in ks)


def _tree_bytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _worker(args) -> dict:
  """One (kind, mode) measurement in this process; returns its figures."""
  kind, mode = args.worker
  dtype = jnp.dtype(args.dtype)
  config = dataclasses.replace(FluxConfig.dev(), num_attention_heads=args.heads)
  quant = svdq_jax.QuantConfig.preset(args.preset)
  with tempfile.TemporaryDirectory() as tmp:
    file = Path(tmp) / "block.safetensors"
    _write_block(file, kind, config, dtype)
    samples = _samples(args, config, dtype)
    jax.block_until_ready(samples)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    group = DOUBLE if kind == "double" else SINGLE
    prefix = f"{group}/0"
    started = time.perf_counter()
    with CheckpointReader(file) as reader:
      blocks = BlockReader(reader, config, None if args.dtype == "float32" else dtype)
      if mode == "whole":
        block = blocks.block(group, 0)
        weights = _tree_bytes(nnx.state(block, nnx.Param))
        params = {group: {"0": {}}}
        node = params[group]["0"]
        for path, variable in nnx.to_flat_state(nnx.state(block, nnx.Param)):
          parts = [str(p) for p in path]
          target = node
          for part in parts[:-1]:
            target = target.setdefault(part, {})
          target[parts[-1]] = variable.get_value()

        def run(state, block=block):
          block(*state)

        stats = svdq_jax.calibrate(run, samples, model=params, progress=False)
        quantized = svdq_jax.quantize_params(params, stats, quant, progress=False,
                                             devices=args.devices)
        jax.block_until_ready(quantized)
        del stats
      else:
        per_step = len(samples) // args.steps
        for step in range(args.steps):  # pass 1: the trajectory, one read per step
          block = blocks.block(group, 0)
          states = [list(s) for s in samples[step * per_step:(step + 1) * per_step]]
          for state in states:
            state[1], state[0] = block(*state)
          jax.block_until_ready(states)
          weights = _tree_bytes(nnx.state(block, nnx.Param))
          del block, states
        block = blocks.block(group, 0)
        quantized = calibrate_quantize_block(block, prefix, [list(s) for s in samples], quant,
                                             args.devices)
        del block
    elapsed = time.perf_counter() - started
    rows = len(samples) * (args.image_tokens + args.text_tokens)
    stats_bytes = _stats_bytes(file, rows)
  device = jax.devices()[0]
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use")
           for d in jax.local_devices()[:args.devices]] if device.platform != "cpu" else []
  return {"kind": kind, "mode": mode, "seconds": elapsed,
          "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "baseline_rss": baseline, "weights": weights, "stats": stats_bytes,
          "quantized": _tree_bytes(quantized),
          "device_peak": max((p for p in peaks if p is not None), default=None),
          "device": str(device), "samples": len(samples)}


def _gb(n: float | None) -> str:
  return "-" if n is None else f"{n / 1e9:.2f}"


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(args)))
    return 0
  env = {**os.environ, "JAX_PLATFORMS": args.platform}
  rows = {}
  for kind in args.kinds.split(","):
    for mode in args.modes.split(","):
      cmd = [sys.executable, __file__, "--worker", kind, mode, "--runs", str(args.runs),
             "--steps", str(args.steps), "--image-tokens", str(args.image_tokens),
             "--text-tokens", str(args.text_tokens), "--preset", args.preset,
             "--heads", str(args.heads), "--devices", str(args.devices),
             "--dtype", args.dtype]
      result = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)
        return result.returncode
      rows[kind, mode] = row = json.loads(result.stdout.strip().splitlines()[-1])
      print(f"{kind:6s} {mode:6s} {row['seconds']:8.1f} s  peak RSS {_gb(row['peak_rss'])} GB "
            f"(before the block {_gb(row['baseline_rss'])} GB)  device peak "
            f"{_gb(row['device_peak'])} GB  float weights {_gb(row['weights'])} GB  stats "
            f"{_gb(row['stats'])} GB  quantized {_gb(row['quantized'])} GB", flush=True)
  first = next(iter(rows.values()))
  print(f"\n{args.preset}, {args.dtype} calibration, {first['samples']} samples "
        f"({args.runs} runs x {args.steps} steps) of {args.image_tokens} image + "
        f"{args.text_tokens} text tokens, width {args.heads * 128}, on {first['device']}"
        f"{f' and {args.devices - 1} more' if args.devices > 1 else ''}")
  print(f"{'mode':8s} {'t double s':>11s} {'t single s':>11s} {'57 blocks h':>12s} "
        f"{'est. peak GB':>13s}")
  cache = args.runs * args.steps * (args.image_tokens + args.text_tokens) * args.heads * 128 * 4
  for mode in args.modes.split(","):
    if not all((kind, mode) in rows for kind in KINDS):
      continue
    d, s = rows["double", mode], rows["single", mode]
    hours = (COUNTS["double"] * d["seconds"] + COUNTS["single"] * s["seconds"]) / 3600
    if mode == "whole":
      working = max(r["peak_rss"] - r["weights"] - r["stats"] for r in (d, s))
      peak = working + sum(COUNTS[k] * (rows[k, mode]["weights"] + rows[k, mode]["stats"])
                           for k in KINDS)
    else:
      peak = (max(d["peak_rss"], s["peak_rss"]) + cache
              + sum(COUNTS[k] * rows[k, mode]["quantized"] for k in KINDS))
    print(f"{mode:8s} {d['seconds']:11.1f} {s['seconds']:11.1f} {hours:12.2f} {peak / 1e9:13.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
