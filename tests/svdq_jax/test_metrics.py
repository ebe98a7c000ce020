"""metrics against float64 numpy computations of their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svdq_jax.metrics import feature_distance, psnr, relative_error


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
