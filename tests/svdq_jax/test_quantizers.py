"""Property tests of the quantizers: round trips, packing, NVFP4 value sets and scale ranges."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from svdq_jax import quantizers as qz

SETTINGS = settings(max_examples=25, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def _rows(group: int):
  """Two rows of two groups: a fixed shape, so every example reuses the compiled quantizer."""
  return hnp.arrays(np.float32, (2, 2 * group), elements=finite)


@SETTINGS
@given(_rows(64), st.sampled_from(["int4", "int8"]))
def test_int_round_trip_within_half_a_step(x, fmt):
  q = qz.quantize(jnp.asarray(x), fmt, 64, scale_dtype=jnp.float32)
  back = np.asarray(qz.dequantize(q, fmt, 64))
  step = np.repeat(np.asarray(q.scales), 64, axis=-1)
  assert np.all(np.abs(back - x) <= 0.5 * step * (1 + 1e-6) + 1e-30)  # 1e-30: underflow
  qmax = qz.INT4_QMAX if fmt == "int4" else qz.INT8_QMAX
  assert np.all(np.abs(np.asarray(q.codes)) <= qmax)


@SETTINGS
@given(_rows(64))
def test_unsigned_int4_round_trip_for_non_negative_inputs(x):
  x = np.abs(x)
  q = qz.quantize(jnp.asarray(x), "uint4", 64)
  codes = np.asarray(q.codes)
  assert codes.min() >= 0 and codes.max() <= 15
  step = np.repeat(np.asarray(q.scales), 64, axis=-1)
  # Groups whose scale underflows float32 (amax < 15 * 2^-126) quantize to zero.
  assert np.all(np.abs(np.asarray(qz.dequantize(q, "uint4", 64)) - x)
                <= 0.5 * step * (1 + 1e-6) + 1e-30)


@SETTINGS
@given(_rows(64))
def test_bf16_scales_keep_codes_in_range(x):
  q = qz.quantize(jnp.asarray(x), "int4", 64, scale_dtype=jnp.bfloat16)
  assert q.scales.dtype == jnp.bfloat16
  codes = np.asarray(q.codes)
  assert codes.min() >= -8 and codes.max() <= 7


@SETTINGS
@given(_rows(16))
@example(np.full((1, 16), np.finfo(np.float32).tiny, np.float32))
def test_nvfp4_values_scales_and_round_trip(x):
  q = qz.quantize(jnp.asarray(x), "nvfp4", 16, scale_dtype=jnp.float8_e4m3fn)
  assert q.scales.dtype == jnp.float8_e4m3fn
  scales = np.asarray(q.scales.astype(jnp.float32))
  assert np.all(np.isfinite(scales)) and scales.min() >= 0 and scales.max() <= 448
  values = qz.E2M1_VALUES[np.asarray(q.codes)]
  assert not np.any(np.asarray(q.codes) == 8)  # no -0 code: +0 is written instead
  e2m1_set = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
  assert set(np.abs(values).ravel().tolist()) <= e2m1_set
  # The codes are the bit patterns ml_dtypes uses for float4_e2m1fn.
  decoded = np.asarray(q.codes).astype(np.uint8).view(ml_dtypes.float4_e2m1fn)
  np.testing.assert_array_equal(decoded.astype(np.float32), values)
  # Where the group scale is a normal E4M3 number (>= 2^-6, rounded by at most 1/16), each element
  # is within half the local E2M1 spacing (<= 1 at magnitude 4..6) of its step plus the clipping
  # that the scale's rounding can cause (<= 0.4 step, not on top of the former).
  step = np.repeat(scales, 16, axis=-1) * float(q.tensor_scale)
  error = np.abs(np.asarray(qz.dequantize(q, "nvfp4", 16)) - x)
  normal = np.repeat(scales >= 2.0 ** -6, 16, axis=-1)
  assert np.all(error[normal] <= 1.0 * step[normal] * (1 + 1e-6))
  # Groups far below the tensor's largest value (subnormal or zero scales) lose precision, but
  # never by more than their own largest magnitude.
  group_max = np.repeat(np.abs(x).reshape(*x.shape[:-1], -1, 16).max(-1), 16, axis=-1)
  assert np.all(error[~normal] <= 1.5 * group_max[~normal] + 1e-30)


@pytest.mark.parametrize("magnitude", [1e-20, 1e-3, 1.0, 1e4, 3e30])
def test_nvfp4_weight_tensor_scale_is_bf16_and_keeps_group_scales_in_e4m3(magnitude):
  """The tensor scale is amax / (6 * 448) rounded up to a bfloat16 value (Nunchaku stores it in
  bfloat16): never below it (no group scale saturates), less than one bf16 step above it."""
  x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32) * np.float32(magnitude)
  q = qz.quantize(jnp.asarray(x), "nvfp4", 16, scale_dtype=jnp.float8_e4m3fn)
  scales = np.asarray(q.scales.astype(jnp.float32))
  exact = np.float64(np.abs(x).max()) / (6 * 448)
  tensor_scale = float(q.tensor_scale)
  assert float(np.float32(tensor_scale).astype(ml_dtypes.bfloat16)) == tensor_scale
  assert exact <= tensor_scale < exact * (1 + 2.0 ** -7)
  assert 416.0 <= scales.max() <= 448.0  # the largest group scale: within one E4M3 step of 448
  largest = np.abs(x).reshape(8, 4, 16).max(-1) / 6 / tensor_scale
  np.testing.assert_array_equal(scales, largest.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_round_up_to_bfloat16_against_ml_dtypes(np_rng):
  x = np.abs(np_rng.normal(size=1000) * 10.0 ** np_rng.integers(-30, 30, 1000)).astype(np.float32)
  x[:3] = [1.0, np.finfo(np.float32).tiny, 3.0]  # already bf16 values stay
  got = np.asarray(qz.round_up_to_bfloat16(jnp.asarray(x)))
  nearest = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  up = np.nextafter(nearest.astype(ml_dtypes.bfloat16), np.float32(np.inf).astype(
      ml_dtypes.bfloat16)).astype(np.float32)
  np.testing.assert_array_equal(got, np.where(nearest >= x, nearest, up))


@SETTINGS
@given(_rows(64))
def test_nf4_round_trip_within_half_the_table_spacing(x):
  q = qz.quantize(jnp.asarray(x), "nf4", 64, scale_dtype=jnp.float32)
  back = np.asarray(qz.dequantize(q, "nf4", 64))
  scale = np.repeat(np.asarray(q.scales), 64, axis=-1)
  max_gap = np.diff(qz.NF4_VALUES).max()
  assert np.all(np.abs(back - x) <= 0.5 * max_gap * scale * (1 + 1e-6) + 1e-30)


def test_nf4_table_matches_bitsandbytes():
  # The published NF4 code book (QLoRA / bitsandbytes), first and last four entries.
  published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
               0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
  np.testing.assert_allclose(np.r_[qz.NF4_VALUES[:4], qz.NF4_VALUES[-4:]], published, atol=1e-6)
  assert qz.NF4_VALUES[7] == 0.0


@SETTINGS
@given(hnp.arrays(np.int8, (3, 16), elements=st.integers(-8, 7)))
def test_pack_round_trip_and_int4_layout(codes):
  packed = qz.pack_nibbles(jnp.asarray(codes))
  assert packed.dtype == jnp.uint8 and packed.shape[-1] == codes.shape[-1] // 2
  np.testing.assert_array_equal(np.asarray(qz.unpack_nibbles(packed, signed=True)), codes)
  # Same bits as XLA's own int4 packing (docs/format.md).
  as_int4 = jax.lax.bitcast_convert_type(packed, jnp.int4).reshape(codes.shape)
  np.testing.assert_array_equal(np.asarray(as_int4.astype(jnp.int8)), codes)


@SETTINGS
@given(hnp.arrays(np.uint8, (3, 16), elements=st.integers(0, 15)))
def test_unsigned_pack_round_trip(codes):
  packed = qz.pack_nibbles(jnp.asarray(codes))
  np.testing.assert_array_equal(np.asarray(qz.unpack_nibbles(packed, signed=False)), codes)


def test_zero_groups_quantize_to_zero_codes():
  x = jnp.zeros((2, 64))
  for fmt in ("int4", "int8", "nf4"):
    q = qz.quantize(x, fmt, 64)
    assert np.all(np.asarray(qz.dequantize(q, fmt, 64)) == 0)
  assert np.all(np.asarray(qz.dequantize(qz.quantize(x, "nvfp4", 16), "nvfp4", 16)) == 0)


def test_bad_group_and_format_raise():
  with pytest.raises(ValueError, match="multiple of group_size"):
    qz.quantize(jnp.ones((2, 48)), "int4", 64)
  with pytest.raises(ValueError, match="unknown format"):
    qz.quantize(jnp.ones((2, 64)), "int3", 64)
