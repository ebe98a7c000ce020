"""Shared test fixtures. Tests run on CPU, offline; torch/diffusers are test-only references."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from svdq_jax import dot  # noqa: E402


@pytest.fixture
def np_rng() -> np.random.Generator:
  """A seeded numpy generator (tests must be deterministic)."""
  return np.random.default_rng(0)


@pytest.fixture
def key() -> jax.Array:
  return jax.random.key(0)


@pytest.fixture
def fake_svdq_kernel(monkeypatch) -> tuple[types.SimpleNamespace, list[dict]]:
  """Replaces the fused kernel (`pallas_kernels.svdq_linear.svdq_linear`) and the device check that
  `svdq_jax.dot` sees with stand-ins: returns (device, calls); `device.supported` is what
  `is_supported()` answers, `calls` records each kernel call's arguments (the output is zeros)."""
  calls = []
  device = types.SimpleNamespace(supported=True)

  def svdq_linear(x, qweight, wscales, smooth, lora_down, lora_up, bias, *, group_size=64,
                  act_shift=0.0, out_dtype=None, interpret=False):
    calls.append({"x_shape": x.shape, "bias": bias, "group_size": group_size,
                  "act_shift": act_shift, "interpret": interpret})
    return jnp.zeros((x.shape[0], qweight.shape[0]), out_dtype)

  monkeypatch.setattr(dot.kernels, "svdq_linear", svdq_linear)
  monkeypatch.setattr(dot.kernels, "is_supported", lambda device_=None: device.supported)
  monkeypatch.setattr(dot, "_NOTICES", set())
  return device, calls
