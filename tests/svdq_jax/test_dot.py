"""svdq_dot: the exact integer product, the reference path and the Pallas dispatch logic."""

import dataclasses
import threading
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.svdq_linear as kernels
import svdq_jax
from svdq_jax import (
  QuantConfig,
  QuantFormat,
  SVDQLinear,
  dot,
  is_quantized,
  kernel_check,
  qlinear,
  quantize_linear,
  svdq_dot,
  use_impl,
)
from svdq_jax import quantizers as qz
from svdq_jax.errors import InputError

K, N, T = 128, 96, 64


@pytest.fixture(scope="module")
def layer_data():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(K, N)).astype(np.float32) / np.sqrt(K)
  x = rng.normal(size=(T, K)).astype(np.float32)
  x[:, 5] *= 20
  return kernel, x


def _quantized(layer_data, preset, **overrides):
  kernel, x = layer_data
  return quantize_linear(jnp.asarray(kernel), None, jnp.asarray(x),
                         QuantConfig.preset(preset, **overrides))


def _weight_integers(w: SVDQLinear) -> tuple[np.ndarray, float]:
  codes = np.asarray(w.weight_codes())
  if w.weight_format == "nvfp4":
    return (2 * qz.E2M1_VALUES[codes]).astype(np.int64), 0.5
  return codes.astype(np.int64), 1.0


@pytest.mark.parametrize("preset", ["w4a4", "smoothquant-w4a4", "svdquant-nvfp4", "w8a8"])
def test_integer_part_matches_float64_numpy(layer_data, preset):
  w = _quantized(layer_data, preset, rank=0, svd_iters=0)
  x = jnp.asarray(layer_data[1][:16])
  codes, ascales = qlinear.quantize_activations(x, w)
  a_int, a_factor = _weight_integers(_activation_view(w, codes))
  w_int, w_factor = _weight_integers(w)
  group = w.group_size
  groups = K // group
  a_g = a_int.reshape(-1, groups, group)
  w_g = w_int.reshape(N, groups, group)
  psums = np.einsum("mgk,ngk->mng", a_g, w_g)  # int64, exact
  # The integer sums alone (unit scales): exact, bit for bit.
  ones_a = jnp.ones((a_g.shape[0], groups), jnp.float32)
  ones_w = jnp.ones((groups, N), jnp.float32)
  a8, _ = qlinear._integer_operand(codes, w.act_format)
  w8, _ = qlinear._integer_operand(w.weight_codes(), w.weight_format)
  total = qlinear.grouped_integer_product(a8, ones_a, w8, ones_w, group)
  np.testing.assert_array_equal(np.asarray(total, np.float64), psums.sum(-1).astype(np.float64))
  # With scales: float64 of the same quantized values, within the float32 accumulation bound.
  terms = (np.asarray(ascales, np.float64)[:, None, :] * np.asarray(
      w.wscales.astype(jnp.float32), np.float64).T[None] * psums * a_factor * w_factor)
  expected = terms.sum(-1) * float(w.wtscale)
  got = np.asarray(svdq_dot(x, w, impl="xla"), np.float64) - _bias(w)
  bound = (groups + 3) * 2.0 ** -23 * np.abs(terms).sum(-1) * float(w.wtscale) + 1e-30
  assert np.all(np.abs(got - expected) <= bound)


def _activation_view(w, act_codes):
  """A stand-in exposing activation codes through `weight_codes` (for `_weight_integers`)."""
  return types.SimpleNamespace(weight_codes=lambda: act_codes, weight_format=w.act_format)


def _bias(w):
  return 0.0 if w.bias is None else np.asarray(w.bias, np.float64)


def test_full_layer_matches_its_parts_in_float64(layer_data):
  """Shifted INT4 + low-rank branch + folded bias + layer bias against a float64 recomputation."""
  kernel, x = layer_data
  gelu_x = np.asarray(jax.nn.gelu(jnp.asarray(x)))
  w = quantize_linear(jnp.asarray(kernel), jnp.ones((N,)), jnp.asarray(gelu_x),
                      QuantConfig.preset("svdquant-int4", svd_iters=1))
  assert w.act_shift == qz.GELU_SHIFT and w.rank == 32
  layer_bias = jnp.arange(N, dtype=jnp.float32) / N
  xs = jnp.asarray(gelu_x[:8])
  codes, ascales = qlinear.quantize_activations(xs, w)
  assert int(codes.min()) >= 0  # unsigned
  deq_x = np.asarray(codes, np.float64).reshape(8, -1, 64) * np.asarray(ascales, np.float64)[
      ..., None]
  deq_r = np.asarray(w.dequantize_residual(), np.float64)
  lora = np.asarray(w.lora_down.astype(jnp.float32), np.float64) @ np.asarray(
      w.lora_up.astype(jnp.float32), np.float64)
  expected = (deq_x.reshape(8, K) @ deq_r + np.asarray(xs, np.float64) @ lora
              + np.asarray(w.bias, np.float64) + np.asarray(layer_bias, np.float64))
  got = np.asarray(svdq_dot(xs, w, bias=layer_bias, impl="xla"), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  # And the quantized layer approximates the float one (bias 1 folded in).
  reference = np.asarray(xs, np.float64) @ kernel + 1.0 + np.asarray(layer_bias)
  assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.1


def test_leading_batch_shapes_and_dtypes(layer_data):
  w = _quantized(layer_data, "w4a4")
  x = jnp.asarray(layer_data[1][:12])
  flat = svdq_dot(x, w, impl="xla")
  batched = svdq_dot(x.reshape(2, 3, 2, K), w, impl="xla")
  assert batched.shape == (2, 3, 2, N)
  np.testing.assert_array_equal(np.asarray(batched).reshape(12, N), np.asarray(flat))
  assert svdq_dot(x.astype(jnp.bfloat16), w).dtype == jnp.bfloat16
  jitted = jax.jit(lambda x, w: svdq_dot(x, w))(x, w)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(flat), rtol=1e-6, atol=1e-6)


def test_plain_kernel_and_weight_only_paths(layer_data):
  kernel, x = layer_data
  xs = jnp.asarray(x[:4])
  bias = jnp.ones((N,))
  np.testing.assert_allclose(np.asarray(svdq_dot(xs, jnp.asarray(kernel), bias=bias)),
                             x[:4] @ kernel + 1, rtol=1e-5, atol=1e-4)
  w = quantize_linear(jnp.asarray(kernel), None, None, QuantConfig.preset("nf4-w4a16"))
  assert not w.format.quantizes_activations
  expected = x[:4].astype(np.float64) @ np.asarray(w.dequantize(), np.float64) + 1
  np.testing.assert_allclose(np.asarray(svdq_dot(xs, w, bias=bias)), expected, rtol=1e-5,
                             atol=1e-4)
  assert is_quantized(w) and not is_quantized(jnp.asarray(kernel))
  with pytest.raises(ValueError, match="input features"):
    svdq_dot(jnp.ones((2, K + 1)), w)
  with pytest.raises(InputError, match="impl"):
    svdq_dot(xs, w, impl="cuda")


def test_metadata_round_trip(layer_data):
  w = _quantized(layer_data, "svdquant-int4", svd_iters=0)
  metadata = w.metadata()
  assert metadata["format"] == {"weight_format": "int4", "act_format": "int4", "group_size": 64,
                                "act_shift": w.act_shift}
  assert "config" not in metadata  # the search settings and layer rules stay out of the layer
  rebuilt = SVDQLinear.from_arrays({k: np.asarray(v) for k, v in w.arrays().items()}, metadata)
  assert rebuilt.format == w.format == QuantFormat("int4", "int4", 64, w.act_shift)
  x = jnp.asarray(layer_data[1][:4])
  np.testing.assert_array_equal(np.asarray(svdq_dot(x, rebuilt)), np.asarray(svdq_dot(x, w)))
  arrays = {k: np.asarray(v) for k, v in w.arrays().items()}
  arrays["wscales"] = arrays["wscales"].astype(np.float32)
  with pytest.raises(ValueError, match="wscales"):
    SVDQLinear.from_arrays(arrays, w.metadata())
  with pytest.raises(ValueError, match="missing"):
    SVDQLinear.from_arrays({"qweight": arrays["qweight"]}, w.metadata())


def test_per_channel_wcscales_scale_the_quantized_path_and_round_trip(layer_data):
  """NVFP4 with per-channel wcscales (Nunchaku's fused q/k/v): the 4-bit part of each output
  channel is scaled, the branch and the biases are not; metadata says so only when present."""
  w = _quantized(layer_data, "svdquant-nvfp4", svd_iters=0)
  assert "has_wcscales" not in w.metadata()
  wcscales = jnp.asarray(np.random.default_rng(2).uniform(0.5, 2.0, N).astype(np.float32))
  scaled = dataclasses.replace(w, wcscales=wcscales)
  x = jnp.asarray(layer_data[1][:8])
  branch = np.asarray(x @ w.lora_down.astype(jnp.float32) @ w.lora_up.astype(jnp.float32))
  quantized = np.asarray(svdq_dot(x, w, impl="xla"), np.float64) - branch - _bias(w)
  got = np.asarray(svdq_dot(x, scaled, impl="xla"), np.float64) - branch - _bias(w)
  np.testing.assert_allclose(got, quantized * np.asarray(wcscales), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scaled.dequantize_residual()),
                             np.asarray(w.dequantize_residual()) * np.asarray(wcscales),
                             rtol=1e-6)
  metadata = scaled.metadata()
  assert metadata["has_wcscales"] is True
  arrays = {k: np.asarray(v) for k, v in scaled.arrays().items()}
  rebuilt = SVDQLinear.from_arrays(arrays, metadata)
  np.testing.assert_array_equal(np.asarray(rebuilt.wcscales), np.asarray(wcscales))
  with pytest.raises(InputError, match="unexpected.*wcscales"):
    SVDQLinear.from_arrays(arrays, w.metadata())
  assert "wcscales" in dot.pallas_unsupported_reason(x, dataclasses.replace(
      _quantized(layer_data, "w4a4"), wcscales=wcscales), interpret=True)


# ---- dispatch ---------------------------------------------------------------------------------


def test_explicit_pallas_calls_the_kernel_with_both_biases(layer_data, fake_svdq_kernel):
  _, calls = fake_svdq_kernel
  w = _quantized(layer_data, "w4a4")
  layer_bias = jnp.full((N,), 2.0)
  y = svdq_dot(jnp.ones((2, 3, K)), w, bias=layer_bias, impl="pallas-interpret")
  assert y.shape == (2, 3, N) and calls[-1]["x_shape"] == (6, K) and calls[-1]["interpret"]
  np.testing.assert_array_equal(np.asarray(calls[-1]["bias"]), np.full((N,), 2.0))
  svdq_dot(jnp.ones((2, K)), w, impl="pallas")
  assert calls[-1]["interpret"] is False


def test_explicit_pallas_names_why_it_cannot_serve_the_case(layer_data, fake_svdq_kernel):
  device, calls = fake_svdq_kernel
  x = jnp.ones((2, K))
  nf4 = _quantized(layer_data, "nf4-w4a16", svd_iters=0)
  with pytest.raises(InputError, match="INT4 W4A4 only.*weight nf4 / activations None"):
    svdq_dot(x, nf4, impl="pallas")
  w = _quantized(layer_data, "w4a4")
  device.supported = False
  with pytest.raises(InputError, match="Hopper"):
    svdq_dot(x, w, impl="pallas")
  svdq_dot(x, w, impl="pallas-interpret")  # the interpreter runs on any device
  assert len(calls) == 1
  wide = dataclasses.replace(w, lora_down=jnp.zeros((K, 0), jnp.bfloat16),
                             lora_up=jnp.zeros((0, N), jnp.bfloat16))
  assert dot.pallas_unsupported_reason(x, wide, interpret=True) is None
  ranked = dataclasses.replace(w, lora_down=jnp.zeros((K, 300), jnp.bfloat16),
                               lora_up=jnp.zeros((300, N), jnp.bfloat16))
  with pytest.raises(InputError, match="rank 300"):
    svdq_dot(x, ranked, impl="pallas-interpret")
  assert len(calls) == 1


def test_auto_uses_the_kernel_only_on_a_supported_gpu(layer_data, fake_svdq_kernel, monkeypatch):
  device, calls = fake_svdq_kernel
  w = _quantized(layer_data, "w4a4")
  x = jnp.ones((2, K))
  device.supported = False
  svdq_dot(x, w)  # CPU: XLA
  assert not calls
  monkeypatch.setattr(dot, "_backend", lambda: "gpu")
  device.supported = True
  svdq_dot(x, w)
  assert len(calls) == 1
  device.supported = False
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = svdq_dot(x, w)
    svdq_dot(x, w)
  assert len(calls) == 1 and len(caught) == 1 and "Hopper" in str(caught[0].message)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(svdq_dot(x, w, impl="xla")))
  nvfp4 = _quantized(layer_data, "svdquant-nvfp4", rank=0, svd_iters=0)
  device.supported = True
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    svdq_dot(x, nvfp4)
  assert len(calls) == 1 and "nvfp4" in str(caught[0].message)


def test_impl_precedence_argument_then_context_then_auto(layer_data, fake_svdq_kernel):
  device, calls = fake_svdq_kernel
  w = _quantized(layer_data, "w4a4")
  x = jnp.ones((2, K))
  assert svdq_jax.current_impl() == "auto"
  with use_impl("pallas-interpret"):
    assert svdq_jax.current_impl() == "pallas-interpret"
    svdq_dot(x, w)
    assert len(calls) == 1
    svdq_dot(x, w, impl="xla")  # the argument wins
    assert len(calls) == 1
    with use_impl("xla"):  # the innermost context wins
      svdq_dot(x, w)
    assert len(calls) == 1
    jax.jit(lambda x: svdq_dot(x, w))(x)  # read at trace time
    assert len(calls) == 2
  assert svdq_jax.current_impl() == "auto"
  svdq_dot(x, w)  # auto on a supported device: the kernels
  assert len(calls) == 3
  device.supported = False
  svdq_dot(x, w)  # auto elsewhere: XLA
  assert len(calls) == 3
  with pytest.raises(InputError, match="'cuda' is not one of"):
    with use_impl("cuda"):
      pass


def test_use_impl_is_per_thread(layer_data):
  seen = []
  with use_impl("xla"):
    thread = threading.Thread(target=lambda: seen.append(svdq_jax.current_impl()))
    thread.start()
    thread.join()
    seen.append(svdq_jax.current_impl())
  assert seen == ["auto", "xla"]


def test_xla_path_agrees_with_the_kernel_reference(layer_data):
  """The contract of docs/format.md seen from both sides: our XLA product and the jnp reference
  of the Pallas kernel (pallas_kernels.svdq_linear) on the same SVDQLinear and bf16 input."""
  reference = pytest.importorskip("pallas_kernels.svdq_linear.reference")
  kernel, x = layer_data
  gelu_x = np.asarray(jax.nn.gelu(jnp.asarray(x)))
  w = quantize_linear(jnp.asarray(kernel), None, jnp.asarray(gelu_x),
                      QuantConfig.preset("svdquant-int4", svd_iters=0))
  assert w.act_shift == qz.GELU_SHIFT
  xs = jnp.asarray(gelu_x[:16], jnp.bfloat16)
  theirs = reference.svdq_linear_reference(
      xs, w.qweight, w.wscales, w.smooth, w.lora_down, w.lora_up, w.bias,
      group_size=w.group_size, act_shift=w.act_shift, out_dtype=jnp.float32)
  ours = xla_dot_f32(xs, w)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def xla_dot_f32(x, w):
  """Our reference product of bf16 x, returned before the final cast to x's dtype."""
  return qlinear.xla_dot(x.astype(jnp.float32), w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_path_quantizes_the_input_like_the_xla_path(layer_data, dtype, monkeypatch):
  """One answer per input: the kernels quantize x from its own dtype (an f32 x is not rounded to
  bf16 first), so their codes and scales equal the XLA path's bit for bit and the outputs agree
  to the output's rounding (the f32 low-rank branch: to about 2^-16 of its size)."""
  monkeypatch.setenv(kernel_check.SKIP_ENV, "1")  # tests/svdq_jax/test_kernel_check.py runs it
  kernel, x = layer_data
  gelu_x = jax.nn.gelu(jnp.asarray(x[:40]))
  w = quantize_linear(jnp.asarray(kernel), None, gelu_x,
                      QuantConfig.preset("svdquant-int4", svd_iters=0))
  xs = gelu_x.astype(dtype)
  packed, scales, _ = kernels.quantize_activations(xs, w.smooth, w.lora_down,
                                                   act_shift=w.act_shift, interpret=True)
  codes, want_scales = qlinear.quantize_activations(xs, w)
  np.testing.assert_array_equal(np.asarray(kernels.unpack_int4(packed, unsigned=True)),
                                np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_scales))
  got = np.asarray(svdq_dot(xs, w, impl="pallas-interpret"), np.float64)
  want = np.asarray(xla_dot_f32(xs, w), np.float64)
  assert got.dtype == want.dtype
  rounding = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
  low_rank = (np.abs(np.asarray(xs, np.float64)) @ np.abs(np.asarray(w.lora_down, np.float64))
              @ np.abs(np.asarray(w.lora_up, np.float64)))
  bound = rounding * np.abs(want) + 2.0 ** -16 * low_rank + 1e-6 * np.abs(want).max()
  assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))
