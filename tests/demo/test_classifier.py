"""demo.classifier: shapes, save/load, augmentation, prompt accuracy, Frechet distance."""

import numpy as np
import pytest

from demo import classifier as C
from svdq_jax.errors import InputError


@pytest.fixture(scope="module")
def model():
  return C.EmojiClassifier(C.ClassifierConfig(num_classes=5, widths=(8, 16, 16, 16)),
                           rngs=C.nnx.Rngs(0))


def test_forward_shapes(model, np_rng):
  images = np_rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  assert model(images).shape == (3, 5)
  assert model.features(images).shape == (3, 16)
  assert [m.shape for m in model.feature_maps(images)] == [
      (3, 32, 32, 8), (3, 16, 16, 16), (3, 8, 8, 16), (3, 4, 4, 16)]
  assert C.predict(model, images).shape == (3,)


def test_save_load_round_trip(model, tmp_path, np_rng):
  images = np_rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  C.save_classifier(model, list("abcde"), tmp_path / "cls")
  loaded, labels = C.load_classifier(tmp_path / "cls")
  assert labels == list("abcde")
  np.testing.assert_array_equal(C.features(loaded, images), C.features(model, images))
  with pytest.raises(InputError, match="not a demo classifier"):
    C.load_classifier(tmp_path)


def test_prompt_accuracy_counts_matches(model, np_rng):
  images = np_rng.uniform(size=(4, 32, 32, 3)).astype(np.float32)
  predicted = C.predict(model, images)
  labels = list("abcde")
  right = [labels[i] for i in predicted]
  wrong = [labels[(i + 1) % 5] for i in predicted]
  assert C.prompt_accuracy(model, labels, images, right) == 1.0
  assert C.prompt_accuracy(model, labels, images, wrong) == 0.0
  with pytest.raises(InputError, match="not among"):
    C.prompt_accuracy(model, labels, images, ["zebra"] * 4)


def test_augment_keeps_range_and_varies(np_rng):
  images = np.full((2, 32, 32, 3), 255, np.uint8)
  images[:, 12:20, 12:20] = (200, 30, 30)
  out = C.augment(images, np_rng)
  assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 1
  assert not np.allclose(out[0], out[1])


def test_frechet_distance_matches_diagonal_closed_form(np_rng):
  # Independent coordinates: the Frechet distance is |mu_a - mu_b|^2 + sum (sa - sb)^2 per
  # coordinate (standard deviations), computed here with numpy alone from the sample moments.
  a = np_rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
  b = np_rng.normal(size=(4000, 3)) * [1.5, 1.0, 0.5] + [1.0, 0.0, -2.0]
  a -= a.mean(0) - [0.0, 0.0, 0.0]
  b -= b.mean(0) - [1.0, 0.0, -2.0]
  # Decorrelate exactly (whiten the sample covariance to diagonal) so the closed form holds.
  a = a @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T * [1.0, 2.0, 0.5]
  b = (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(b, rowvar=False))).T * [
      1.5, 1.0, 0.5] + [1.0, 0.0, -2.0]
  sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
  expected = np.square(a.mean(0) - b.mean(0)).sum() + np.square(sa - sb).sum()
  assert C.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
  assert C.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_renders_round_trip_and_bad_sheet(tmp_path, np_rng):
  renders = np_rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
  C.save_renders(renders, tmp_path / C.RENDERS_FILE)
  np.testing.assert_array_equal(C.load_renders(tmp_path, 37), renders)
  np.testing.assert_array_equal(C.load_renders(tmp_path, 5), renders[:5])
  with pytest.raises(InputError, match="expected"):
    C.load_renders(tmp_path, 100)
  with pytest.raises(InputError, match="cannot read"):
    C.load_renders(tmp_path / "nope", 5)
