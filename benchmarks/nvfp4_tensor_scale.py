"""Whether rounding the NVFP4 per-tensor weight scale up to a bfloat16 value changes layer error.

Nunchaku stores `wtscale` in bfloat16, so `svdq_jax.quantizers.nvfp4_tensor_scale` rounds
amax / (6 * 448) up to the next bfloat16 value (at most 2^-7 relative) for our NVFP4 layers to
export exactly. This script quantizes outlier layers (`svdq_jax.evaluation.outlier_layer`, GELU
inputs for K > N) with the float32 tensor scale (the rounding patched out) and with the rounded
one, and prints the held-out relative output error of both against the float64 product, per
layer and seed, for the svdquant-nvfp4 preset and for plain NVFP4 round to nearest (rank 0, no
smoothing), with the mean ratio rounded / float32.

Usage: python benchmarks/nvfp4_tensor_scale.py [--shapes 1024x1024,...] [--seeds 3]
         [--tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from unittest import mock

import jax
import numpy as np

from svdq_jax import quantizers as qz
from svdq_jax.evaluation import evaluate_preset, outlier_layer, parse_shapes

SHAPES = ((1024, 1024), (1024, 4096), (4096, 1024))
# (label, preset, overrides): the preset as shipped (one smoothing alpha and two refinement steps,
# to keep the CPU run short) and plain NVFP4 round to nearest.
CONFIGS = (
    ("svdquant-nvfp4", "svdquant-nvfp4", {"smooth": (0.5,), "svd_iters": 2}),
    ("nvfp4 rtn", "svdquant-nvfp4", {"rank": 0, "smooth": None, "svd_iters": 0}),
)


def _error(kernel: np.ndarray, x: np.ndarray, preset: str, overrides: dict, tokens: int,
           *, rounded: bool) -> float:
  jax.clear_caches()  # the transform is jitted: retrace it with or without the rounding
  if rounded:
    return evaluate_preset(kernel, x, preset, calibration_tokens=tokens,
                           **overrides).relative_error
  with mock.patch.object(qz, "round_up_to_bfloat16", lambda scale: scale):
    return evaluate_preset(kernel, x, preset, calibration_tokens=tokens,
                           **overrides).relative_error


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", type=parse_shapes, default=list(SHAPES),
                      help="comma-separated KxN (in x out) kernel shapes")
  parser.add_argument("--seeds", type=int, default=3, help="layers per shape")
  parser.add_argument("--tokens", type=int, default=128,
                      help="calibration tokens (as many held-out tokens are evaluated)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f"# nvfp4_tensor_scale: jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.machine()}), {args.tokens} calibration + {args.tokens} held-out tokens")
  print("# error = ||y_q - y||/||y|| vs the float64 product; 'f32' = tensor scale amax/(6*448) "
        "in float32,")
  print("# 'bf16' = rounded up to a bfloat16 value (what svdq-jax does)", flush=True)
  for label, preset, overrides in CONFIGS:
    ratios = []
    print(f"{label}:")
    for k, n in args.shapes:
      for seed in range(args.seeds):
        kernel, x = outlier_layer(seed, k, n, args.tokens, gelu_input=k > n)
        exact = _error(kernel, x, preset, overrides, args.tokens, rounded=False)
        rounded = _error(kernel, x, preset, overrides, args.tokens, rounded=True)
        ratios.append(rounded / exact)
        print(f"  {k}x{n} seed {seed}: f32 {exact:.5f}  bf16 {rounded:.5f}  "
              f"ratio {rounded / exact:.4f}", flush=True)
    print(f"  mean ratio bf16 / f32 over {len(ratios)} layers: {np.mean(ratios):.4f} "
          f"(min {np.min(ratios):.4f}, max {np.max(ratios):.4f})")
  print(f"# {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
