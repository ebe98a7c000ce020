"""svdq_jax.kernel_check: the once-per-process check of the Pallas kernels, run here in the Mosaic
GPU interpreter against correct kernels and deliberately wrong ones (monkeypatched)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.svdq_linear as kernels
from svdq_jax import QuantConfig, dot, kernel_check, quantize_linear, svdq_dot
from svdq_jax.kernel_check import KernelCheckError

K, N = 128, 128
REAL = {name: getattr(kernels, name) for name in ("quantize_activations", "w4a4_gemm",
                                                  "svdq_linear")}


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
  """Each test starts with nothing checked, the check on, and leaves no failure behind."""
  monkeypatch.delenv(kernel_check.SKIP_ENV, raising=False)
  kernel_check.reset()
  yield
  kernel_check.reset()
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

  interpret_pallas_call.reset_gpu_interpret_mode_state()


@pytest.fixture(scope="module")
def layer():
  """An svdquant-int4 layer (shifted codes, rank 32) and its post-GELU f32 inputs (40, K)."""
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(K, N)).astype(np.float32) / np.sqrt(K)
  x = np.asarray(jax.nn.gelu(jnp.asarray(rng.normal(size=(40, K)), jnp.float32)))
  w = quantize_linear(jnp.asarray(kernel), None, jnp.asarray(x),
                      QuantConfig.preset("svdquant-int4", svd_iters=0))
  return w, jnp.asarray(x)


def _counting_checks(monkeypatch) -> list:
  """Records each check that runs (each call of kernel_check._compare)."""
  runs = []
  compare = kernel_check._compare

  def counted(case):
    runs.append(case)
    return compare(case)

  monkeypatch.setattr(kernel_check, "_compare", counted)
  return runs


def _interpreted(name, monkeypatch, corrupt=None):
  """Makes kernels.<name> run in the interpreter whatever it is asked, optionally corrupting its
  result: a stand-in for the compiled kernel on a GPU where it is (or is not) right."""
  real = REAL[name]

  def run(*args, interpret=False, **kwargs):
    out = real(*args, interpret=True, **kwargs)
    return out if corrupt is None else corrupt(out)

  monkeypatch.setattr(kernels, name, run)


def _flip_one_code(out):
  packed, *rest = out
  return (packed.at[0, 0].set(packed[0, 0] ^ 1), *rest)


def _on_a_hopper(monkeypatch):
  """`auto` sees a supported GPU and must not reach the fused kernel itself."""
  monkeypatch.setattr(kernels, "is_supported", lambda device=None: True)

  def no_pallas(*args, **kwargs):
    raise AssertionError("auto ran the Pallas kernels after they failed their check")

  monkeypatch.setattr(dot, "_pallas_dot", no_pallas)


def test_correct_kernels_pass_once_per_configuration(layer, monkeypatch):
  w, x = layer
  runs = _counting_checks(monkeypatch)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not kernel_check.kernels_failed(x, w, interpret=True)
    assert not kernel_check.kernels_failed(x[:7], w, interpret=True)  # the same configuration
    # Traced inside jit: the check runs outside the trace (and is cached for the case).
    jax.jit(lambda x: jnp.asarray(kernel_check.kernels_failed(x, w, interpret=True)))(
        x.astype(jnp.bfloat16))
  assert [case.x_dtype for case in runs] == ["float32", "bfloat16"]
  assert runs[0].act_shift == w.act_shift and runs[0].rank == 32 and runs[0].interpret


def test_wrong_codes_warn_once_then_auto_uses_xla_and_pallas_raises(layer, monkeypatch):
  w, x = layer
  _on_a_hopper(monkeypatch)
  _interpreted("quantize_activations", monkeypatch, _flip_one_code)
  runs = _counting_checks(monkeypatch)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = svdq_dot(x, w)
    y_jit = jax.jit(lambda x: svdq_dot(x, w))(jnp.concatenate([x] * 4))  # another config
  assert len(runs) == 1
  assert len(caught) == 1 and caught[0].category is RuntimeWarning
  message = str(caught[0].message)
  device = jax.devices()[0]
  assert f"{device.device_kind} ({device.platform}:{device.id})" in message
  assert "QuantizeConfig(" in message and "GemmConfig(" in message and "rank 32" in message
  assert "kernel 1 gave 1 of" in message and "activation codes unlike the XLA path" in message
  np.testing.assert_array_equal(np.asarray(y), np.asarray(svdq_dot(x, w, impl="xla")))
  assert y_jit.shape == (160, N)
  with pytest.raises(KernelCheckError, match="failed their self-check.*use impl='xla' or 'auto'"):
    svdq_dot(x, w, impl="pallas")
  assert len(runs) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name,corrupt,needle", [
    ("w4a4_gemm", lambda y: y.at[3, 5].add(1.0), "kernel 2 gave 1 of"),
    ("svdq_linear", lambda y: y * (1 + 2**-6), "the fused kernels' output differs"),
])
def test_wrong_gemm_or_fused_output_is_caught(layer, monkeypatch, name, corrupt, needle):
  w, x = layer
  _interpreted(name, monkeypatch, corrupt)
  with pytest.warns(RuntimeWarning, match=needle):
    with pytest.raises(KernelCheckError, match=needle):
      svdq_dot(x, w, impl="pallas-interpret")


def test_the_environment_variable_turns_the_check_off(layer, monkeypatch):
  w, x = layer
  _interpreted("quantize_activations", monkeypatch, _flip_one_code)
  runs = _counting_checks(monkeypatch)
  monkeypatch.setenv(kernel_check.SKIP_ENV, "1")
  assert kernel_check.skipped()
  assert not kernel_check.kernels_failed(x, w, interpret=True)
  monkeypatch.setenv(kernel_check.SKIP_ENV, "0")
  assert not kernel_check.skipped()
  assert not runs


def test_a_kernel_that_raises_has_failed(layer, monkeypatch):
  w, x = layer

  def broken(*args, **kwargs):
    raise RuntimeError("ptxas fatal: unsupported instruction\nsecond line")

  monkeypatch.setattr(kernels, "quantize_activations", broken)
  with pytest.warns(RuntimeWarning, match="RuntimeError: ptxas fatal: unsupported instruction;"):
    assert kernel_check.kernels_failed(x, w, interpret=True)
  assert set(kernel_check._FAILURES) == {True}  # the compiled kernels are not marked
