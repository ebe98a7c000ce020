"""Layer-level quality of every preset: the table of benchmarks/quant_error.py.

The test layers follow a documented recipe (`outlier_layer`) that mimics what SVDQuant reports for
diffusion transformers: activations with a few channels far larger than the rest (channel-wise
outliers, the same channels in every token) and weights whose spectrum has a few large singular
values plus some input rows with large magnitude (weight outliers).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax.config import QuantConfig
from svdq_jax.metrics import bits_per_weight, relative_error
from svdq_jax.qlinear import xla_dot
from svdq_jax.transform import quantize_linear

FLUX_SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """A test layer: its column label, kernel shape (K = in, N = out) and whether its inputs follow
  a GELU (an MLP down-projection, quantized as shifted unsigned INT4 by svdquant-int4)."""

  label: str
  in_features: int
  out_features: int
  gelu_input: bool = False


def parse_shapes(text: str) -> list[tuple[int, int]]:
  """Parses "3072x3072,12288x3072" into [(3072, 3072), (12288, 3072)] (K = in, N = out): the
  `type=` of the benchmarks' --shapes flags, so a bad value is argparse's one-line error."""
  try:
    shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
  except ValueError:
    shapes = []
  if not shapes or any(len(shape) != 2 for shape in shapes):
    raise argparse.ArgumentTypeError(f"shapes must look like 3072x3072,12288x3072; got {text!r}")
  return shapes


def shape_specs(shapes: Sequence[tuple[int, int]]) -> list[LayerSpec]:
  """One spec per (K, N), labelled "KxN"; layers with K > N (down-projections) get GELU inputs."""
  return [LayerSpec(f"{k}x{n}", k, n, gelu_input=k > n) for k, n in shapes]


ALL_PRESETS = ("bf16", "w8a8", "nf4-w4a16", "w4a4", "smoothquant-w4a4", "svdquant-int4",
               "svdquant-nvfp4")


def outlier_layer(seed: int, in_features: int, out_features: int, tokens: int,
                  *, outlier_channels: float = 0.01, gelu_input: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A kernel (K, N) and activations (2 * tokens, K) with diffusion-model-like outliers.

  Recipe (float32):
    weights = N(0, 1/K) noise + a rank-16 component with singular values 8, 8·0.8, 8·0.8², ...
      (times sqrt(N / K)), then 2% of the input rows (channels) scaled by 6 (weight outliers);
    activations = N(0, 1) per element times a per-token scale in [0.5, 1.5], then 1% of the
      channels (`outlier_channels`) scaled by 20 to 60 (channel-wise outliers) and the others
      times 1; with `gelu_input` the activations are passed through GELU (tanh), as the input of
      an MLP down-projection.
  The first `tokens` rows are for calibration, the rest for evaluation.
  """
  rng = np.random.default_rng(seed)
  k, n = in_features, out_features
  rank = 16
  left = np.linalg.qr(rng.normal(size=(k, rank)))[0]
  right = np.linalg.qr(rng.normal(size=(n, rank)))[0]
  singular = 8.0 * 0.8 ** np.arange(rank)
  kernel = rng.normal(size=(k, n)) / np.sqrt(k) + (left * singular) @ right.T * np.sqrt(n / k)
  kernel[rng.choice(k, max(1, int(0.02 * k)), replace=False)] *= 6.0
  x = rng.normal(size=(2 * tokens, k)) * rng.uniform(0.5, 1.5, size=(2 * tokens, 1))
  channels = rng.choice(k, max(1, int(outlier_channels * k)), replace=False)
  x[:, channels] *= rng.uniform(20, 60, size=channels.shape)
  if gelu_input:
    x = np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=True))
  return kernel.astype(np.float32), x.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LayerResult:
  """One row of the table: a preset on one layer shape."""

  preset: str
  layer: str
  relative_error: float
  bits_per_weight: float
  seconds: float


def evaluate_preset(kernel: np.ndarray, activations: np.ndarray, preset: str, *,
                    calibration_tokens: int, label: str = "", **overrides: Any
                    ) -> LayerResult:
  """Quantizes `kernel` with `preset` on the first `calibration_tokens` rows and measures the
  relative output error on the remaining rows against the float64 product."""
  calib, test = activations[:calibration_tokens], activations[calibration_tokens:]
  reference = test.astype(np.float64) @ kernel.astype(np.float64)
  config = QuantConfig.preset(preset, **overrides)
  start = time.perf_counter()
  if config.weight_format is None:
    layer = jnp.asarray(kernel, jnp.bfloat16)
    jax.block_until_ready(layer)
    seconds = time.perf_counter() - start
    output = jnp.asarray(test, jnp.bfloat16).astype(jnp.float32) @ layer.astype(jnp.float32)
  else:
    layer = quantize_linear(jnp.asarray(kernel), None, jnp.asarray(calib), config)
    jax.block_until_ready(layer)
    seconds = time.perf_counter() - start
    output = xla_dot(jnp.asarray(test), layer)
  return LayerResult(preset, label or "x".join(map(str, kernel.shape)),
                     relative_error(output, reference),
                     bits_per_weight(layer), seconds)


def error_table(layers: Sequence[LayerSpec], presets: Sequence[str] = ALL_PRESETS, *,
                tokens: int = 256, seed: int = 0, progress: bool = False) -> list[LayerResult]:
  """Every preset on an outlier layer (`outlier_layer`, seed + index) per spec."""
  results = []
  for index, spec in enumerate(layers):
    kernel, activations = outlier_layer(seed + index, spec.in_features, spec.out_features,
                                        tokens, gelu_input=spec.gelu_input)
    for preset in presets:
      result = evaluate_preset(kernel, activations, preset, calibration_tokens=tokens,
                               label=spec.label)
      if progress:
        print(f"  {preset:18s} {spec.label}: {result.relative_error:.4f} "
              f"({result.seconds:.1f} s)", flush=True)
      results.append(result)
  return results


def format_table(results: Sequence[LayerResult]) -> str:
  """A plain-text table: one row per preset, relative error per layer, mean bits/weight, and
  the quantization seconds summed over the layers."""
  layers = list(dict.fromkeys(r.layer for r in results))
  presets = list(dict.fromkeys(r.preset for r in results))
  by_key = {(r.preset, r.layer): r for r in results}
  width = max(17, *(len(layer) + 7 for layer in layers))
  head = f"{'preset':18s}" + "".join(f"{'err ' + layer:>{width}s}" for layer in layers)
  head += f"{'bits/weight':>13s}{'quant s':>9s}"
  lines = [head, "-" * len(head)]
  for preset in presets:
    rows = [by_key[(preset, layer)] for layer in layers]
    line = f"{preset:18s}" + "".join(f"{r.relative_error:{width}.4f}" for r in rows)
    bits = np.mean([r.bits_per_weight for r in rows])
    seconds = sum(r.seconds for r in rows)
    lines.append(line + f"{bits:13.2f}{seconds:9.1f}")
  return "\n".join(lines)
