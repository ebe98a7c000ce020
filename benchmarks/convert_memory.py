"""Conversion speed and peak memory on a synthetic full-width FLUX.1 checkpoint.

Writes a diffusers-layout FluxTransformer2DModel checkpoint with FLUX.1-dev's widths (hidden 3072,
24 heads, guidance embedding) but only a few blocks, in bfloat16, sharded one block per file with
a `*.safetensors.index.json` (written with our `save_file`, no torch). Then converts it with
`convert.api.convert` in a fresh subprocess and prints the time, the bytes per second and the
peak resident memory (`resource.getrusage` in that subprocess) against the checkpoint size.

    python benchmarks/convert_memory.py [--double 2] [--single 2] [--out FILE]
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
import ml_dtypes
import numpy as np
import orbax.checkpoint  # noqa: F401
from flax import nnx

from convert.api import convert
from convert.checkpoint import load_checkpoint
from convert.flux import CONFIG_FIELDS, key_table
from convert.safetensors_io import CheckpointReader, save_file
from models.flux import FluxConfig

_GIB = 1024**3


def write_synthetic_flux(folder: Path, num_layers: int, num_single_layers: int) -> None:
  """A FLUX.1-dev-width diffusers checkpoint with the given block counts, bf16 N(0, 0.02²) weights.

  One shard per block (plus one for the embedders and the output layers) keeps this process at
  about one block of memory.
  """

  config = dataclasses.replace(FluxConfig.dev(), num_layers=num_layers,
                               num_single_layers=num_single_layers)
  folder.mkdir(parents=True)
  diffusers_config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"}
  diffusers_config.update({k: getattr(config, k) for k in CONFIG_FIELDS})
  diffusers_config["axes_dims_rope"] = list(config.axes_dims_rope)
  (folder / "config.json").write_text(json.dumps(diffusers_config, indent=2))
  shards: dict[str, dict[str, tuple[int, ...]]] = {}
  for key, entry in key_table(config).items():
    parts = key.split(".")
    group = ".".join(parts[:2]) if parts[0].endswith("transformer_blocks") else "other"
    shards.setdefault(group, {})[key] = entry.shape
  rng = np.random.default_rng(0)
  weight_map = {}
  for i, shapes in enumerate(shards.values()):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {k: (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16)
               for k, s in shapes.items()}
    save_file(tensors, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    del tensors
  index = {"metadata": {}, "weight_map": weight_map}
  (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _folder_bytes(folder: Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _measure(stage: str, src: str, dst: str) -> None:
  """Runs in a fresh process: one stage, with wall time, CPU time and peak RSS measured.

  "convert": `convert(src, dst)`; "load": `load_checkpoint(dst)` (what `from_pretrained` on our
  folder does). Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux); the
  baseline is taken after jax, flax, orbax and the model code are imported, so the difference is
  the stage's own.
  """


  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  if stage == "convert":
    convert(src, dst, progress=False)
  else:
    jax.block_until_ready(jax.tree.leaves(nnx.state(load_checkpoint(dst))))
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
  print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "baseline_rss": before.ru_maxrss * 1024,
                    "peak_rss": after.ru_maxrss * 1024, "load": os.getloadavg()[0]}))


def _stage_rows(name: str, stats: dict, size: int, largest: int) -> list[tuple[str, str]]:
  """Table rows of one measured stage: time, throughput and peak RSS against `size`."""
  extra = stats["peak_rss"] - stats["baseline_rss"]
  return [
      (f"{name}: time", f"{stats['seconds']:.1f} s wall, {stats['cpu_seconds']:.1f} s CPU "
                        f"(load average {stats['load']:.1f} on {os.cpu_count()} cores)"),
      (f"{name}: throughput", f"{size / stats['seconds'] / 1e6:.0f} MB/s"),
      (f"{name}: peak RSS", f"{stats['peak_rss'] / _GIB:.3f} GiB, "
                            f"{stats['baseline_rss'] / _GIB:.3f} GiB after imports"),
      (f"{name}: peak - imports", f"{extra / _GIB:.3f} GiB = {extra / size:.2f} x checkpoint, "
                                  f"{(extra - size) / largest:+.2f} largest tensors beyond it"),
  ]


def _run(*args: str) -> str:
  """Runs this script with `args` in a fresh CPU-only Python; returns its stdout."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                          text=True, check=False)
  if result.returncode:
    sys.exit(f"{args[0]} failed:\n{result.stderr}")
  return result.stdout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
  parser.add_argument("--single", type=int, default=2, help="single-stream blocks")
  parser.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
  parser.add_argument("--out", default=None, help="also write the table to this file")
  parser.add_argument("--stage", nargs=3, metavar=("STAGE", "SRC", "DST"), help=argparse.SUPPRESS)
  parser.add_argument("--write", metavar="SRC", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.stage:
    _measure(*args.stage)
    return
  if args.write:
    write_synthetic_flux(Path(args.write), args.double, args.single)
    return
  with tempfile.TemporaryDirectory(dir=args.workdir) as work:
    src, dst = Path(work) / "flux_src", Path(work) / "flux_ours"
    start = time.perf_counter()
    _run("--write", str(src), "--double", str(args.double), "--single", str(args.single))
    write_seconds = time.perf_counter() - start
    with CheckpointReader(src) as reader:
      size, tensors = reader.nbytes(), len(reader)
      largest = max(reader.nbytes(k) for k in reader)
    convert_stats, load_stats = (
        json.loads(_run("--stage", stage, str(src), str(dst)).splitlines()[-1])
        for stage in ("convert", "load"))
    output = _folder_bytes(dst)
  rows = [
      ("checkpoint", f"FLUX.1-dev width, {args.double} double + {args.single} single blocks, "
                     f"bf16, {tensors} tensors"),
      ("checkpoint size", f"{size / _GIB:.3f} GiB (largest tensor {largest / _GIB:.3f} GiB)"),
      ("output size (orbax)", f"{output / _GIB:.3f} GiB"),
      ("synthetic write", f"{write_seconds:.1f} s"),
      *_stage_rows("convert", convert_stats, size, largest),
      *_stage_rows("load ours", load_stats, size, largest),
  ]
  width = max(len(name) for name, _ in rows)
  table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
  print(table)
  if args.out:
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
  main()
