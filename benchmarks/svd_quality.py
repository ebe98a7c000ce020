"""What the randomized rank-32 SVD of `quantize_linear` costs against an exact SVD, on FLUX.1's
linear-layer shapes.

Part 1, low-rank residual: for each shape two weight matrices (K, N) float32,
  "power-law": N(0, 1/K) noise plus a rank-min(256, K, N) component whose singular values decay
    as 8 * (1 + sqrt(N / K)) * (i + 1)^-0.5 (trained-transformer-like: a few large values, a slow
    tail that meets the noise bulk near i = 64), then 2% of the input rows scaled by 4 and 0.5%
    of the output columns by 3 (planted outlier rows and columns);
  "smoothed outliers": the kernel of `svdq_jax.evaluation.outlier_layer` (the recipe of
    benchmarks/quant_error.py) times the smoothing diag(max|x|^0.5) of its activations, which is
    the matrix `low_rank` factors in the smoothing search;
and ||W - L1 L2||_F of `low_rank` at rank 32 (exact float32 SVD, randomized with 1, 2, 3 and 4
power iterations), as the excess over the Eckart-Young optimum sqrt(sum_{i >= 32} s_i^2) from a
numpy float64 SVD, with the time of one call (compiled beforehand).

Part 2, end to end: held-out relative output error ||y_q - y|| / ||y|| (against the float64
product) of `quantize_linear` with each SVD on outlier layers (GELU inputs for K > N, as
quant_error.py), and its time. The exact SVD takes 6 to 109 s per call on a loaded 2-core CPU
(benchmarks/results/svd_quality_cpu.txt) and the transform calls it once per smoothing candidate
and refinement step, so part 2 uses the svdquant-int4 preset with the alpha grid (0.5,)
(3 candidates) and svd_iters 2.

Usage: python benchmarks/svd_quality.py [--shapes 3072x3072,...] [--layer-shapes ...]
         [--power-iters 1,2,3,4] [--layer-power-iters 1,2,3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from collections.abc import Callable, Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax import transform
from svdq_jax.evaluation import FLUX_SHAPES, evaluate_preset, outlier_layer, parse_shapes

RANK = 32
LAYER_SHAPES = ((3072, 3072), (12288, 3072))


def _ints(text: str) -> list[int]:
  """Parses "1,2,3" into [1, 2, 3] (power iteration counts, each >= 0)."""
  parts = text.split(",")
  if not all(part.isdecimal() and part.isascii() for part in parts):
    raise argparse.ArgumentTypeError(f"power iterations must look like 1,2,3; got {text!r}")
  return [int(part) for part in parts]


def power_law_weights(seed: int, k: int, n: int) -> np.ndarray:
  """The "power-law" matrix (K, N) float32 of the module docstring."""
  rng = np.random.default_rng(seed)
  components = min(256, k, n)
  left = np.linalg.qr(rng.normal(size=(k, components)))[0]
  right = np.linalg.qr(rng.normal(size=(n, components)))[0]
  bulk_edge = 1 + np.sqrt(n / k)  # largest singular value of the N(0, 1/K) noise
  singular = 8 * bulk_edge * (1.0 + np.arange(components)) ** -0.5
  w = rng.normal(size=(k, n)) / np.sqrt(k) + (left * singular) @ right.T
  w[rng.choice(k, int(0.02 * k), replace=False)] *= 4.0
  w[:, rng.choice(n, int(0.005 * n), replace=False)] *= 3.0
  return w.astype(np.float32)


def smoothed_outlier_weights(seed: int, k: int, n: int, tokens: int) -> np.ndarray:
  """The "smoothed outliers" matrix (K, N) float32 of the module docstring."""
  kernel, x = outlier_layer(seed, k, n, tokens, gelu_input=k > n)
  return (np.abs(x[:tokens]).max(axis=0) ** 0.5)[:, None] * kernel


def _timed(fn: Callable, *args, repeats: int = 1) -> tuple[object, float]:
  """fn(*args) compiled ahead, then run `repeats` times: (result, median seconds per run)."""
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return result, float(np.median(seconds))


def residual_rows(label: str, w: np.ndarray, power_iters: Sequence[int]) -> list[str]:
  """Part 1 for one matrix: the optimum and one line per SVD method."""
  start = time.perf_counter()
  singular = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  reference_seconds = time.perf_counter() - start
  optimum = np.sqrt(np.sum(singular[RANK:] ** 2))
  lines = [f"{label}: optimum ||W - W_32|| / ||W|| = {optimum / np.linalg.norm(singular):.4f}, "
           f"s_1 / s_32 / s_33 = {singular[0]:.2f} / {singular[RANK - 1]:.2f} / "
           f"{singular[RANK]:.2f} (numpy float64 SVD {reference_seconds:.1f} s)"]
  w64 = w.astype(np.float64)
  key = jax.random.key(0)
  methods = [("exact float32", None, 1)] + [(f"randomized p={p}", p, 3) for p in power_iters]
  for name, iters, repeats in methods:
    factor = functools.partial(transform.low_rank, rank=RANK, power_iters=iters)
    (left, right), seconds = _timed(lambda m, f=factor: f(m, key=key), jnp.asarray(w),
                                    repeats=repeats)
    residual = np.linalg.norm(w64 - np.asarray(left, np.float64) @ np.asarray(right, np.float64))
    lines.append(f"  {name:16s} excess {100 * (residual / optimum - 1):7.3f} %   "
                 f"{seconds:7.3f} s per call")
  return lines


def layer_row(k: int, n: int, seed: int, tokens: int, power_iters: int | None) -> str:
  """Part 2 for one shape and SVD method (None: exact)."""
  kernel, x = outlier_layer(seed, k, n, tokens, gelu_input=k > n)
  svd = functools.partial(transform.low_rank, power_iters=power_iters)
  # quantize_linear reaches low_rank through the module global; the cleared caches make the jitted
  # transform trace again with this variant.
  with mock.patch.object(transform, "low_rank", svd):
    jax.clear_caches()
    result = evaluate_preset(kernel, x, "svdquant-int4", calibration_tokens=tokens,
                             smooth=(0.5,), svd_iters=2)
  jax.clear_caches()
  name = "exact float32" if power_iters is None else f"randomized p={power_iters}"
  return (f"  {k}x{n} {name:16s} error {result.relative_error:.5f}   "
          f"quantize {result.seconds:6.1f} s (with compilation)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", type=parse_shapes, default=list(FLUX_SHAPES),
                      help="KxN (in x out) shapes of part 1 (low-rank residual)")
  parser.add_argument("--layer-shapes", type=parse_shapes, default=list(LAYER_SHAPES),
                      help="KxN shapes of part 2 (quantize_linear end to end)")
  parser.add_argument("--power-iters", type=_ints, default=[1, 2, 3, 4],
                      help="power iterations of the randomized SVD to compare")
  parser.add_argument("--layer-power-iters", type=_ints, default=[1, 2, 3],
                      help="power iterations of the randomized SVD in part 2 (besides exact)")
  parser.add_argument("--tokens", type=int, default=128,
                      help="calibration tokens (as many held-out tokens are evaluated)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f"# svd_quality: jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.machine()}), rank {RANK}, default power iterations "
        f"{transform.POWER_ITERS}")
  print("# part 1: excess of ||W - L1 L2||_F over the Eckart-Young optimum (numpy float64 SVD)",
        flush=True)
  for seed, (k, n) in enumerate(args.shapes):
    for label, w in (("power-law", power_law_weights(seed, k, n)),
                     ("smoothed outliers", smoothed_outlier_weights(seed, k, n, args.tokens))):
      print("\n".join(residual_rows(f"{k}x{n} {label}", w, args.power_iters)), flush=True)
  print(f"# part 2: held-out relative output error of quantize_linear (svdquant-int4, smooth "
        f"(0.5,), svd_iters 2, {args.tokens} calibration tokens)", flush=True)
  for seed, (k, n) in enumerate(args.layer_shapes):
    for iters in [None, *args.layer_power_iters]:
      print(layer_row(k, n, seed, args.tokens, iters), flush=True)
  print(f"# total {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
