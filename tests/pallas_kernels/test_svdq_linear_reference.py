"""The jnp references of the fused SVDQuant linear against float64 numpy math (no kernels)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from pallas_kernels.svdq_linear import (
    pack_int4,
    quantize_activations_reference,
    unpack_int4,
    w4a4_gemm_reference,
)


def _np_unpack(packed: np.ndarray, unsigned: bool) -> np.ndarray:
  """Independent numpy unpacking of docs/format.md: low nibble = even k."""
  lo, hi = packed & 0xF, packed >> 4
  codes = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.int64)
  codes[..., 0::2], codes[..., 1::2] = lo, hi
  return codes if unsigned else np.where(codes >= 8, codes - 16, codes)


@pytest.mark.parametrize("unsigned", [False, True])
def test_pack_unpack_follow_the_format(np_rng, unsigned):
  lo_code, hi_code = (0, 16) if unsigned else (-8, 8)
  codes = np_rng.integers(lo_code, hi_code, (5, 128))
  packed = np.asarray(pack_int4(jnp.asarray(codes, jnp.int8)))
  assert packed.dtype == np.uint8 and packed.shape == (5, 64)
  np.testing.assert_array_equal(_np_unpack(packed, unsigned), codes)
  np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), unsigned=unsigned)),
                                codes)
  as_4bit = lax.bitcast_convert_type(jnp.asarray(packed), jnp.uint4 if unsigned else jnp.int4)
  np.testing.assert_array_equal(np.asarray(as_4bit.reshape(5, 128).astype(jnp.int32)), codes)


@pytest.mark.parametrize("act_shift", [0.0, 0.171875])
def test_quantize_reference_matches_float64(np_rng, act_shift):
  m, k, r = 37, 256, 16
  x = np_rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
  if act_shift:
    x = np.maximum(x, -act_shift).astype(ml_dtypes.bfloat16)
  x[3, 64:128] = -act_shift  # a group that is zero after the shift: scale 0, codes 0
  smooth = np_rng.uniform(0.5, 2.0, k).astype(np.float32)
  lora_down = (np_rng.standard_normal((k, r)) * 0.1).astype(ml_dtypes.bfloat16)
  codes, ascales, lora_act = quantize_activations_reference(
      jnp.asarray(x), jnp.asarray(smooth), jnp.asarray(lora_down), act_shift=act_shift)

  qmin, qmax = (0, 15) if act_shift else (-8, 7)
  xs = ((x.astype(np.float64) + act_shift) / smooth.astype(np.float64)).reshape(m, k // 64, 64)
  scale = np.abs(xs).max(-1) / qmax
  np.testing.assert_allclose(np.asarray(ascales), scale, rtol=3e-7)
  assert np.asarray(ascales)[3, 1] == 0.0
  ratio = xs / np.where(scale == 0, 1.0, scale)[..., None]
  expected = np.clip(np.rint(ratio), qmin, qmax).reshape(m, k)
  got = _np_unpack(np.asarray(codes), unsigned=act_shift != 0.0)
  near_tie = (np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5).reshape(m, k)
  np.testing.assert_array_equal(got[~near_tie], expected[~near_tie])
  assert near_tie.mean() < 1e-3
  lora64 = x.astype(np.float64) @ lora_down.astype(np.float64)
  np.testing.assert_allclose(np.asarray(lora_act), lora64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unsigned,apply_gelu", [(False, False), (True, True)])
def test_gemm_reference_matches_float64(np_rng, unsigned, apply_gelu):
  m, k, n, r = 24, 192, 40, 16
  groups = k // 64
  codes = np_rng.integers(0, 256, (m, k // 2)).astype(np.uint8)
  qweight = np_rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
  ascales = np_rng.uniform(0.01, 0.1, (m, groups)).astype(np.float32)
  wscales = np_rng.uniform(0.01, 0.1, (groups, n)).astype(ml_dtypes.bfloat16)
  lora_act = np_rng.standard_normal((m, r)).astype(np.float32)
  lora_up = (np_rng.standard_normal((r, n)) * 0.1).astype(ml_dtypes.bfloat16)
  bias = np_rng.standard_normal(n).astype(np.float32)
  y = w4a4_gemm_reference(
      jnp.asarray(codes), jnp.asarray(ascales), jnp.asarray(qweight), jnp.asarray(wscales),
      jnp.asarray(lora_act), jnp.asarray(lora_up), jnp.asarray(bias), unsigned_acts=unsigned,
      apply_gelu=apply_gelu, out_dtype=jnp.float32)

  qa = _np_unpack(codes, unsigned).reshape(m, groups, 64).astype(np.float64)
  qw = _np_unpack(qweight, False).reshape(n, groups, 64).astype(np.float64)
  group_sums = np.einsum("mgk,ngk->mng", qa, qw)
  scales = ascales.astype(np.float64)[:, None, :] * wscales.astype(np.float64).T[None]
  y64 = (group_sums * scales).sum(-1) + lora_act.astype(np.float64) @ lora_up.astype(np.float64)
  y64 = y64 + bias
  if apply_gelu:
    y64 = 0.5 * y64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y64 + 0.044715 * y64**3)))
  np.testing.assert_allclose(np.asarray(y), y64, rtol=1e-5, atol=1e-5 * np.abs(y64).max())
