"""Shared test fixtures. Tests run on CPU, offline; torch/diffusers are test-only references."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def np_rng() -> np.random.Generator:
  """A seeded numpy generator (tests must be deterministic)."""
  return np.random.default_rng(0)


@pytest.fixture
def key() -> jax.Array:
  return jax.random.key(0)
