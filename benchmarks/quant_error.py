"""Relative output error, bits per weight and quantization time of every preset on FLUX.1's
linear-layer shapes, with outlier-laden activations (svdq_jax.evaluation.outlier_layer).

Usage: python benchmarks/quant_error.py [--shapes 3072x3072,...] [--presets a,b] [--tokens 256]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax

from svdq_jax.evaluation import (
    ALL_PRESETS,
    FLUX_SHAPES,
    error_table,
    format_table,
    parse_shapes,
    shape_specs,
)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", type=parse_shapes, default=list(FLUX_SHAPES),
                      help="comma-separated KxN (in x out) kernel shapes")
  parser.add_argument("--presets", default=",".join(ALL_PRESETS))
  parser.add_argument("--tokens", type=int, default=256,
                      help="calibration tokens (as many held-out tokens are evaluated)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f"# quant_error: jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.machine()}), {args.tokens} calibration + {args.tokens} held-out tokens")
  print("# shapes are kernel (K = in, N = out); K > N layers get GELU inputs (MLP down-proj);")
  print("# error = ||y_q - y||/||y|| vs the float64 product; bits/weight include scales, smooth,")
  print("# low-rank branch and bias; 'quant s' is the quantization time summed over the shapes")
  print("# (including XLA compilation).", flush=True)
  results = error_table(shape_specs(args.shapes), args.presets.split(","), tokens=args.tokens,
                        progress=True)
  print(format_table(results))
  print(f"# total {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
