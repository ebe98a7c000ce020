"""Quantizers and dequantizers for INT4, INT8, NVFP4 and NF4, and 4-bit packing.

Every quantizer works on the last axis, in groups of `group_size` consecutive elements: for a weight
that is the (N, K) transpose of the kernel (one scale per output channel and group of K), for
activations it is (M, K) (one scale per token and group, computed dynamically). These functions are
shared by `quantize_linear`, the XLA `svdq_dot` and the tests, so they all see the same codes.

A quantizer has three parts: `group_scales` (one scale per group, already rounded to its storage
dtype, returned as float32), `encode` (values and scales -> codes) and `decode` (codes and scales
-> float32 values). `quantize` / `dequantize` chain them.
"""

from __future__ import annotations

import statistics
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INT4_QMAX = 7
UINT4_QMAX = 15
INT8_QMAX = 127
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GELU_SHIFT = 0.171875  # -min(GELU), rounded to a short binary fraction (DeepCompressor, Nunchaku)

# E2M1 value of each 4-bit pattern (sign bit 3, exponent bits 2-1, mantissa bit 0).
E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _nf4_table() -> np.ndarray:
  """NF4 (QLoRA): quantiles of N(0, 1) normalized to [-1, 1], 8 positive, 7 negative and 0.

  offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 keeps the extreme quantiles finite.
  """
  normal = statistics.NormalDist()
  offset = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
  positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.sort(np.array(positive + [0.0] + negative))
  return (values / np.abs(values).max()).astype(np.float32)


NF4_VALUES = _nf4_table()

FORMATS = ("int4", "uint4", "int8", "nvfp4", "nf4")

# Storage dtype of weight group scales per format (docs/format.md).
WEIGHT_SCALE_DTYPE = {"int4": jnp.bfloat16, "nf4": jnp.bfloat16, "int8": jnp.bfloat16,
                      "nvfp4": jnp.float8_e4m3fn}
# Storage dtype of activation scales per format.
ACT_SCALE_DTYPE = {"int4": jnp.float32, "uint4": jnp.float32, "int8": jnp.float32,
                   "nvfp4": jnp.float8_e4m3fn}


class Quantized(NamedTuple):
  """Codes (..., K) int8 (int4/uint4/int8) or uint8 (nvfp4 bit pattern, nf4 index), scales
  (..., K // group) in their storage dtype, tensor_scale () float32 (NVFP4 weights; 1 otherwise)."""

  codes: jax.Array
  scales: jax.Array
  tensor_scale: jax.Array


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  if x.shape[-1] % group_size:
    raise ValueError(f"last axis {x.shape[-1]} is not a multiple of group_size {group_size}")
  return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _qmax(fmt: str) -> float:
  return {"int4": INT4_QMAX, "uint4": UINT4_QMAX, "int8": INT8_QMAX, "nvfp4": E2M1_MAX,
          "nf4": 1.0}[fmt]


def nvfp4_tensor_scale(x: jax.Array) -> jax.Array:
  """Per-tensor NVFP4 weight scale: amax / (6 * 448) rounded up to a bfloat16 value, so every
  group scale fits in E4M3 and Nunchaku, which stores the scale in bfloat16, holds it exactly
  (`benchmarks/nvfp4_tensor_scale.py` measures that the rounding leaves the layer error as it
  was); at least the smallest normal float32 (a subnormal scale is flushed to 0 on CPU, and 0 / 0
  is NaN)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
  scale = jnp.maximum(amax / (E2M1_MAX * E4M3_MAX), jnp.finfo(jnp.float32).tiny)
  return jnp.where(amax > 0, round_up_to_bfloat16(scale), 1.0).astype(jnp.float32)


def round_up_to_bfloat16(x: jax.Array) -> jax.Array:
  """The smallest bfloat16 value >= x, as float32, for positive finite float32 x (bfloat16 is the
  upper half of the float32 bits: clearing the lower half after adding 0xFFFF rounds up)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def group_scales(xg: jax.Array, fmt: str, scale_dtype, tensor_scale: jax.Array | float = 1.0
                 ) -> jax.Array:
  """Scales (..., G, 1) float32 for grouped values xg (..., G, group): amax / qmax, rounded to
  `scale_dtype` (NVFP4: divided by the tensor scale and saturated at 448 first)."""
  amax = jnp.max(jnp.abs(xg.astype(jnp.float32)), axis=-1, keepdims=True)
  scale = amax / _qmax(fmt)
  if fmt == "nvfp4":
    scale = jnp.minimum(scale / tensor_scale, E4M3_MAX)
  return scale.astype(scale_dtype).astype(jnp.float32)


def encode(xg: jax.Array, scales: jax.Array, fmt: str, tensor_scale: jax.Array | float = 1.0
           ) -> jax.Array:
  """Codes for grouped values xg (..., G, group) given float32 scales (..., G, 1).

  int4/uint4/int8: clip(round_half_even(x / scale)) as int8, 0 where scale == 0.
  nvfp4: the E2M1 bit pattern (uint8) of x / (scale * tensor_scale), round half to even, saturated;
    -0 is written as +0 (the same value; DeepCompressor's codes never hold -0).
  nf4: the index (uint8) of the nearest NF4 value to x / scale.
  """
  x = xg.astype(jnp.float32)
  step = scales * tensor_scale if fmt == "nvfp4" else scales
  ratio = jnp.where(step > 0, x / jnp.where(step > 0, step, 1.0), 0.0)
  if fmt in ("int4", "uint4", "int8"):
    qmax = _qmax(fmt)
    qmin = 0 if fmt == "uint4" else -qmax - 1
    return jnp.clip(jnp.round(ratio), qmin, qmax).astype(jnp.int8)
  if fmt == "nvfp4":
    e2m1 = jnp.clip(ratio, -E2M1_MAX, E2M1_MAX).astype(jnp.float4_e2m1fn)
    codes = jax.lax.bitcast_convert_type(e2m1, jnp.uint4).astype(jnp.uint8)
    return jnp.where(codes == 8, 0, codes).astype(jnp.uint8)  # -0 as +0, the code Nunchaku holds
  if fmt == "nf4":
    midpoints = jnp.asarray((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)
    return jnp.searchsorted(midpoints, ratio).astype(jnp.uint8)
  raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")


def code_values(codes: jax.Array, fmt: str) -> jax.Array:
  """The float32 value each code stands for (before scaling)."""
  if fmt in ("int4", "uint4", "int8"):
    return codes.astype(jnp.float32)
  if fmt == "nvfp4":
    return jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]
  if fmt == "nf4":
    return jnp.asarray(NF4_VALUES)[codes.astype(jnp.int32)]
  raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")


def decode(codes_g: jax.Array, scales: jax.Array, fmt: str,
           tensor_scale: jax.Array | float = 1.0) -> jax.Array:
  """float32 values of grouped codes (..., G, group) with scales (..., G, 1)."""
  values = code_values(codes_g, fmt) * scales.astype(jnp.float32)
  return values * tensor_scale if fmt == "nvfp4" else values


def quantize(x: jax.Array, fmt: str, group_size: int, *, scale_dtype=jnp.float32,
             tensor_scale: jax.Array | float | None = None) -> Quantized:
  """Quantizes x (..., K) along K in groups of `group_size`.

  Args:
    x: float array (..., K), K a multiple of group_size.
    fmt: "int4" (signed, [-8, 7], scale amax/7), "uint4" (unsigned, [0, 15], scale amax/15; the
      caller shifts x to be non-negative), "int8", "nvfp4" (group 16, E4M3 scales), "nf4".
    group_size: elements per scale.
    scale_dtype: storage dtype of the scales (bf16 for weights, f32 for INT activations, E4M3 for
      NVFP4).
    tensor_scale: NVFP4 per-tensor scale; None computes it from x for weights (pass 1.0 for
      activations, which have none).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
  if tensor_scale is None:
    tensor_scale = nvfp4_tensor_scale(x) if fmt == "nvfp4" else 1.0
  tensor_scale = jnp.asarray(tensor_scale, jnp.float32)
  xg = _grouped(x, group_size)
  scales = group_scales(xg, fmt, scale_dtype, tensor_scale)
  codes = encode(xg, scales, fmt, tensor_scale)
  return Quantized(codes.reshape(x.shape), scales[..., 0].astype(scale_dtype), tensor_scale)


def dequantize(q: Quantized, fmt: str, group_size: int) -> jax.Array:
  """float32 values (..., K) of `quantize`'s output."""
  codes_g = _grouped(q.codes, group_size)
  values = decode(codes_g, q.scales.astype(jnp.float32)[..., None], fmt, q.tensor_scale)
  return values.reshape(q.codes.shape)


def fake_quantize(x: jax.Array, fmt: str, group_size: int, *, scale_dtype=jnp.float32,
                  tensor_scale: jax.Array | float | None = None) -> jax.Array:
  """dequantize(quantize(x)): the float32 values the quantized tensor stands for."""
  return dequantize(quantize(x, fmt, group_size, scale_dtype=scale_dtype,
                             tensor_scale=tensor_scale), fmt, group_size)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """Packs 4-bit codes (..., K) (int8 in [-8, 7] or [0, 15], or uint8) two per byte (..., K // 2)
  uint8: element k in byte k // 2, low nibble for even k (the layout of jnp.int4 arrays)."""
  if codes.shape[-1] % 2:
    raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of 4-bit codes")
  nibbles = codes.astype(jnp.uint8) & 0xF
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: jax.Array, *, signed: bool) -> jax.Array:
  """Inverse of `pack_nibbles`: (..., K // 2) uint8 -> (..., K) int8 (signed: sign-extended
  two's complement in [-8, 7]) or uint8 in [0, 15]."""
  low = packed & 0xF
  high = packed >> 4
  nibbles = jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
  if signed:
    return ((nibbles.astype(jnp.int8) ^ 8) - 8).astype(jnp.int8)
  return nibbles
