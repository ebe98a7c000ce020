"""Error, quality and size metrics shared by the tests, benchmarks and demos.

    relative_error, psnr                   numeric error of an output or an image
    feature_map_distance, feature_distance LPIPS-like distance on feature maps / images
    frechet_distance(_from_statistics)     FID-style distance between two feature sets
    prompt_accuracy                        share of predictions equal to their labels
    model_bytes, bits_per_weight           storage size
"""

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


def feature_map_distance(maps: Sequence[Any], reference_maps: Sequence[Any]) -> jax.Array:
  """LPIPS-like distance per image between two lists of feature maps: for each layer, unit-normalize
  every position's channel vector, take the squared difference summed over channels and averaged
  over positions; then average over layers (LPIPS with all learned channel weights one, divided by
  the number of layers).

  Args:
    maps, reference_maps: the same number (>= 1) of channels-last maps (B, H_l, W_l, C_l), map l of
      both of one shape.

  Returns:
    (B,) float32 distances, 0 for identical maps, at most 4.
  """
  if len(maps) != len(reference_maps) or not maps:
    raise ValueError(f"feature_map_distance: {len(maps)} and {len(reference_maps)} feature maps; "
                     "needs the same nonzero number")

  def unit(f: jax.Array) -> jax.Array:
    f = jnp.asarray(f).astype(jnp.float32)
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)

  per_layer = []
  for layer, (a, b) in enumerate(zip(maps, reference_maps, strict=True)):
    if a.shape != b.shape or len(a.shape) != 4:
      raise ValueError(f"feature_map_distance: layer {layer} maps have shapes {a.shape} and "
                       f"{b.shape}; needs one shape (B, H, W, C)")
    per_layer.append(jnp.mean(jnp.sum(jnp.square(unit(a) - unit(b)), axis=-1), axis=(1, 2)))
  return jnp.mean(jnp.stack(per_layer), axis=0)


def feature_distance(image: Any, reference: Any,
                     features: Callable[[jax.Array], Sequence[jax.Array]]) -> jax.Array:
  """`feature_map_distance` of two image batches' feature maps (an LPIPS-like distance).

  Args:
    image, reference: image batches of the same shape, in whatever layout `features` takes.
    features: maps a batch to a sequence of channels-last feature maps (B, H_l, W_l, C_l), e.g.
      `models.vae.AutoencoderKL.feature_maps` of a trained VAE encoder.

  Returns:
    (B,) float32 distances, 0 for identical images.
  """
  return feature_map_distance(features(jnp.asarray(image)), features(jnp.asarray(reference)))


def gaussian_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"gaussian_statistics: features must be (N, D) with N >= 2, got shape "
                     f"{features.shape}")
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix (eigh; negative
  round-off eigenvalues clipped to zero)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_statistics(mean: Any, cov: Any, reference_mean: Any,
                                     reference_cov: Any) -> float:
  """Frechet distance between the Gaussians N(mean, cov) and N(reference_mean, reference_cov):

      |mean - reference_mean|^2 + tr(cov + reference_cov - 2 (cov reference_cov)^(1/2)).

  tr((C1 C2)^(1/2)) is computed as tr((C1^(1/2) C2 C1^(1/2))^(1/2)), the same eigenvalues in a
  symmetric matrix (numpy `eigh` only, no scipy), so the result is real and >= 0 up to round-off.
  """
  mean, reference_mean = np.asarray(mean, np.float64), np.asarray(reference_mean, np.float64)
  cov, reference_cov = np.asarray(cov, np.float64), np.asarray(reference_cov, np.float64)
  d = mean.shape[0]
  if mean.shape != (d,) or reference_mean.shape != (d,) or cov.shape != (d, d) or (
      reference_cov.shape != (d, d)):
    raise ValueError(f"frechet_distance: means {mean.shape}, {reference_mean.shape} and "
                     f"covariances {cov.shape}, {reference_cov.shape} do not fit one dimension")
  root = _psd_sqrt(cov)
  middle = root @ reference_cov @ root
  trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None))))
  distance = (float(np.sum(np.square(mean - reference_mean))) + float(np.trace(cov))
              + float(np.trace(reference_cov)) - 2 * trace_sqrt)
  return max(distance, 0.0)


def frechet_distance(features: Any, reference_features: Any) -> float:
  """Frechet distance (as in FID) between two feature sets (N, D) and (M, D), each summarized by
  its mean and covariance (`gaussian_statistics`)."""
  return frechet_distance_from_statistics(*gaussian_statistics(features),
                                          *gaussian_statistics(reference_features))


def prompt_accuracy(predictions: Any, labels: Any) -> float:
  """The share of predictions equal to their labels (e.g. a classifier's class of each generated
  image against the class its prompt asked for); both 1-D of one nonzero length."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.ndim != 1 or predictions.shape != labels.shape or predictions.size == 0:
    raise ValueError(f"prompt_accuracy: predictions {predictions.shape} and labels "
                     f"{labels.shape} must be 1-D of one nonzero length")
  return float(np.mean(predictions == labels))


def model_bytes(tree: Any) -> int:
  """Bytes of every array leaf of a pytree (arrays or jax.ShapeDtypeStruct; SVDQLinears count
  their packed codes, scales, smooth, low-rank branch and bias)."""
  leaves = jax.tree.leaves(tree)
  return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def bits_per_weight(w: Any) -> float:
  """Storage bits per kernel element, including scales and the low-rank branch."""
  k, n = w.shape
  return 8.0 * model_bytes(w if isinstance(w, SVDQLinear) else [w]) / (k * n)
