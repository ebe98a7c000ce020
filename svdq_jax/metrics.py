"""Error and size metrics shared by the tests, benchmarks and demos."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax.qlinear import SVDQLinear


def relative_error(approx: Any, reference: Any) -> float:
  """||approx - reference||_F / ||reference||_F, computed in float64."""
  approx = np.asarray(approx, np.float64)
  reference = np.asarray(reference, np.float64)
  if approx.shape != reference.shape:
    raise ValueError(f"relative_error: shapes differ, {approx.shape} vs {reference.shape}")
  norm = np.linalg.norm(reference)
  return float(np.linalg.norm(approx - reference) / (norm if norm > 0 else 1.0))


def psnr(image: Any, reference: Any, *, data_range: float = 1.0) -> float:
  """Peak signal-to-noise ratio in dB of `image` against `reference` (inf when identical)."""
  image = np.asarray(image, np.float64)
  reference = np.asarray(reference, np.float64)
  if image.shape != reference.shape:
    raise ValueError(f"psnr: shapes differ, {image.shape} vs {reference.shape}")
  mse = float(np.mean(np.square(image - reference)))
  return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def feature_distance(image: Any, reference: Any,
                     features: Callable[[jax.Array], Sequence[jax.Array]]) -> jax.Array:
  """LPIPS-like distance per image: mean over layers of the spatial mean of the squared
  difference of channel-unit-normalized feature maps (LPIPS without its learned channel weights).

  Args:
    image, reference: image batches of the same shape, in whatever layout `features` takes.
    features: maps a batch to a sequence of channels-last feature maps (B, H_l, W_l, C_l), e.g.
      `models.vae.AutoencoderKL.feature_maps` of a trained VAE encoder.

  Returns:
    (B,) float32 distances, 0 for identical images.
  """
  image_maps, reference_maps = features(jnp.asarray(image)), features(jnp.asarray(reference))
  if len(image_maps) != len(reference_maps) or not image_maps:
    raise ValueError(f"feature_distance: features gave {len(image_maps)} and "
                     f"{len(reference_maps)} maps; needs the same nonzero number")

  def unit(f: jax.Array) -> jax.Array:
    f = f.astype(jnp.float32)
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)

  per_layer = [jnp.mean(jnp.sum(jnp.square(unit(a) - unit(b)), axis=-1), axis=(1, 2))
               for a, b in zip(image_maps, reference_maps, strict=True)]
  return jnp.mean(jnp.stack(per_layer), axis=0)


def model_bytes(tree: Any) -> int:
  """Bytes of every array leaf of a pytree (arrays or jax.ShapeDtypeStruct; SVDQLinears count
  their packed codes, scales, smooth, low-rank branch and bias)."""
  leaves = jax.tree.leaves(tree)
  return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def bits_per_weight(w: Any) -> float:
  """Storage bits per kernel element, including scales and the low-rank branch."""
  k, n = w.shape
  return 8.0 * model_bytes(w if isinstance(w, SVDQLinear) else [w]) / (k * n)
