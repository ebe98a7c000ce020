"""Shared test fixtures. Tests run on CPU, offline; torch/diffusers are test-only references.

Subprocesses the tests start (scripts, `python -m cli`) import this checkout's packages, not
an installed copy: its root leads their PYTHONPATH. `convert.loading` is imported so that every
model's `from_pretrained` finds its loader without the installed entry point (`models.pretrained`).
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import convert.loading  # noqa: E402, F401  (registers the models' checkpoint loader)
from models import pretrained  # noqa: E402
from svdq_jax import dot, kernel_check  # noqa: E402


@pytest.fixture
def no_model_load(monkeypatch):
  """Makes loading any model's weights (`Model.from_pretrained`) a test failure: for checks that
  must come before a model is loaded."""

  def loader(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")

  monkeypatch.setattr(pretrained, "_loaders", [loader])


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
  `is_supported()` answers, `calls` records each kernel call's arguments (the output is zeros).
  The kernels' self-check (`svdq_jax.kernel_check`), which such a stand-in would fail, is off."""
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
  monkeypatch.setenv(kernel_check.SKIP_ENV, "1")
  return device, calls
