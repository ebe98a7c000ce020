"""metrics against float64 numpy computations of their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svdq_jax.metrics import (
  feature_distance,
  feature_map_distance,
  frechet_distance,
  frechet_distance_from_statistics,
  gaussian_statistics,
  prompt_accuracy,
  psnr,
  relative_error,
)


def _pyramid(images):
  """Channels-last feature maps at full and half resolution (2x2 average pooling)."""
  b, h, w, c = images.shape
  half = images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return [images, jnp.concatenate([half, half ** 2], axis=-1)]


def _numpy_feature_distance(a, b):
  """LPIPS without learned weights, in float64: unit-normalize channels, squared difference,
  spatial mean, mean over layers."""
  out = []
  for fa, fb in zip(_pyramid(a.astype(np.float64)), _pyramid(b.astype(np.float64)), strict=True):
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    fa = fa / (np.linalg.norm(fa, axis=-1, keepdims=True) + 1e-10)
    fb = fb / (np.linalg.norm(fb, axis=-1, keepdims=True) + 1e-10)
    out.append(np.square(fa - fb).sum(-1).mean(axis=(1, 2)))
  return np.mean(out, axis=0)


def test_feature_distance_matches_numpy(np_rng):
  a = np_rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  b = a + 0.3 * np_rng.normal(size=a.shape).astype(np.float32)
  got = np.asarray(feature_distance(a, b, _pyramid))
  np.testing.assert_allclose(got, _numpy_feature_distance(a, b), rtol=1e-5)
  assert np.all(np.asarray(feature_distance(a, a, _pyramid)) == 0)
  assert np.all(got > 0)


def test_feature_distance_grows_with_noise(np_rng):
  a = np_rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
  noise = np_rng.normal(size=a.shape).astype(np.float32)
  distances = [float(feature_distance(a, a + s * noise, _pyramid)[0]) for s in (0.05, 0.2, 0.8)]
  assert distances == sorted(distances)


def test_feature_distance_on_vae_features(np_rng):
  from models.vae import AutoencoderKL, VAEConfig

  config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                     latent_channels=4)
  vae = AutoencoderKL(config, rngs=nnx.Rngs(0))
  images = jnp.asarray(np_rng.uniform(-1, 1, size=(2, 3, 16, 16)), jnp.float32)
  maps = vae.feature_maps(images)
  assert [m.shape for m in maps] == [(2, 8, 8, 8), (2, 8, 8, 16)]
  d = feature_distance(images, images[::-1], vae.feature_maps)
  assert d.shape == (2,) and bool(jnp.all(d > 0))


def test_feature_distance_rejects_mismatched_features():
  x = np.zeros((1, 4, 4, 2), np.float32)
  calls = iter([[x], [x, x]])
  with pytest.raises(ValueError, match="same nonzero number"):
    feature_distance(x, x, lambda _: next(calls))


def test_psnr_and_relative_error_against_numpy(np_rng):
  a = np_rng.uniform(size=(4, 5)).astype(np.float32)
  b = a + 0.01 * np_rng.normal(size=a.shape).astype(np.float32)
  mse = np.mean((a.astype(np.float64) - b) ** 2)
  assert psnr(b, a) == pytest.approx(10 * np.log10(1 / mse))
  assert relative_error(b, a) == pytest.approx(np.linalg.norm(b - a.astype(np.float64))
                                               / np.linalg.norm(a.astype(np.float64)))
  assert psnr(a, a) == float("inf")


def test_feature_map_distance_matches_numpy_on_given_maps(np_rng):
  a = np_rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  b = a + 0.5 * np_rng.normal(size=a.shape).astype(np.float32)
  got = np.asarray(feature_map_distance(_pyramid(a), _pyramid(b)))
  np.testing.assert_allclose(got, _numpy_feature_distance(a, b), rtol=1e-5)
  # opposite channel vectors are the farthest apart: |u - (-u)|^2 = 4 at every position
  np.testing.assert_allclose(np.asarray(feature_map_distance([a], [-a])), 4.0, rtol=1e-6)


def test_feature_map_distance_rejects_mismatched_maps():
  x = np.zeros((1, 4, 4, 2), np.float32)
  with pytest.raises(ValueError, match="same nonzero number"):
    feature_map_distance([], [])
  with pytest.raises(ValueError, match="layer 0 maps have shapes"):
    feature_map_distance([x], [x[..., :1]])


def _diagonal_gaussians():
  """Two Gaussians in 5 dimensions with diagonal covariances and their Frechet distance in closed
  form: |m1 - m2|^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2."""
  m1, m2 = np.array([0.0, 1.0, -2.0, 0.5, 3.0]), np.array([1.0, 1.0, 0.0, -0.5, 3.0])
  v1, v2 = np.array([1.0, 4.0, 0.25, 2.0, 9.0]), np.array([4.0, 1.0, 0.25, 0.5, 1.0])
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  return m1, v1, m2, v2, expected


def test_frechet_distance_closed_form_for_diagonal_gaussians(np_rng):
  m1, v1, m2, v2, expected = _diagonal_gaussians()
  got = frechet_distance_from_statistics(m1, np.diag(v1), m2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-12)
  # a common rotation of both Gaussians keeps the distance (covariances no longer diagonal)
  q, _ = np.linalg.qr(np_rng.normal(size=(5, 5)))
  rotated = frechet_distance_from_statistics(q @ m1, q @ np.diag(v1) @ q.T, q @ m2,
                                             q @ np.diag(v2) @ q.T)
  assert rotated == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_samples_approaches_the_closed_form(np_rng):
  m1, v1, m2, v2, expected = _diagonal_gaussians()
  a = m1 + np.sqrt(v1) * np_rng.standard_normal((40_000, 5))
  b = m2 + np.sqrt(v2) * np_rng.standard_normal((40_000, 5))
  assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
  assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
  assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm(np_rng):
  linalg = pytest.importorskip("scipy.linalg")
  a = np_rng.normal(size=(200, 6)) @ np_rng.normal(size=(6, 6))
  b = np_rng.normal(size=(300, 6)) @ np_rng.normal(size=(6, 6)) + 0.3
  (m1, c1), (m2, c2) = gaussian_statistics(a), gaussian_statistics(b)
  expected = (np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2)
              - 2 * np.trace(linalg.sqrtm(c1 @ c2).real))
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
  # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
  assert 0.0 <= frechet_distance(a[:3], b[:4]) < np.inf


def test_frechet_distance_errors():
  with pytest.raises(ValueError, match="N >= 2"):
    frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match="do not fit one dimension"):
    frechet_distance(np.ones((4, 3)), np.ones((4, 2)))


def test_prompt_accuracy():
  assert prompt_accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
  assert prompt_accuracy(np.array(["cat", "dog"]), ["cat", "dog"]) == 1.0
  with pytest.raises(ValueError, match="1-D of one nonzero length"):
    prompt_accuracy([1, 2], [1])
  with pytest.raises(ValueError, match="1-D of one nonzero length"):
    prompt_accuracy([], [])
