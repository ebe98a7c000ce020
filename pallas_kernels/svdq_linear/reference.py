"""Pure-jnp references of the fused SVDQuant linear kernels (docs/format.md semantics).

These define what the kernels compute. The integer part (codes, per-group int32 sums) is bit-exact
with the kernels; the float parts follow the same operation order (per-group f32 rescale and
accumulation for g = 0, 1, 2, ..., then the low-rank product, then the bias), so kernels agree
within float32 summation-order noise before the final cast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.svdq_linear.config import GROUP_SIZE


def code_range(unsigned: bool) -> tuple[int, int]:
  """(qmin, qmax) of the 4-bit activation codes: signed [-8, 7] or unsigned (shifted) [0, 15]."""
  return (0, 15) if unsigned else (-8, 7)


def pack_int4(codes: jax.Array) -> jax.Array:
  """Packs 4-bit codes (..., K) (any int dtype, values in [-8, 15]) into (..., K // 2) uint8.

  Element k sits in byte k // 2, low nibble for even k (the `jnp.int4` packing of docs/format.md).
  """
  c = codes.astype(jnp.int32) & 0xF
  return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, *, unsigned: bool = False) -> jax.Array:
  """Unpacks (..., K // 2) uint8 into (..., K) int8 codes (two's complement unless `unsigned`)."""
  p = packed.astype(jnp.int32)
  nibbles = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
  if not unsigned:
    nibbles = nibbles - ((nibbles & 8) << 1)
  return nibbles.astype(jnp.int8)


def quantize_activations_reference(
    x: jax.Array,
    smooth: jax.Array,
    lora_down: jax.Array,
    *,
    group_size: int = GROUP_SIZE,
    act_shift: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Kernel 1: per-token, per-group 4-bit quantization of x / smooth and the low-rank x @ lora_down.

  Args:
    x: (M, K) activations, bf16 or f32 (the dtypes the kernel reads; see `api.kernel_input_dtype`).
    smooth: (K,) float32 smoothing factors.
    lora_down: (K, r) bfloat16.
    group_size: quantization group along K.
    act_shift: 0 for signed codes; otherwise unsigned codes of x + act_shift.

  Returns:
    codes (M, K // 2) uint8 packed, ascales (M, K // group_size) float32, and x @ lora_down
    (M, r) float32 (bf16 products, f32 sums; an f32 x as hi @ lora_down + lo @ lora_down with
    hi = bf16(x), lo = bf16(x - hi), as the kernel computes it).
  """
  m, k = x.shape
  qmin, qmax = code_range(act_shift != 0.0)
  xs = (x.astype(jnp.float32) + jnp.float32(act_shift)) / smooth.astype(jnp.float32)
  xs = xs.reshape(m, k // group_size, group_size)
  scale = jnp.max(jnp.abs(xs), axis=-1) / jnp.float32(qmax)
  safe_scale = jnp.where(scale == 0, jnp.float32(1), scale)
  q = jnp.clip(jnp.round(xs / safe_scale[..., None]), qmin, qmax).astype(jnp.int8)

  def low_rank(term):
    return jnp.dot(term, lora_down.astype(jnp.bfloat16), preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)

  hi = x.astype(jnp.bfloat16)
  lora_act = low_rank(hi)
  if x.dtype != jnp.bfloat16:
    lora_act = lora_act + low_rank((x.astype(jnp.float32) - hi.astype(jnp.float32)).astype(
        jnp.bfloat16))
  return pack_int4(q.reshape(m, k)), scale, lora_act


def w4a4_gemm_reference(
    codes: jax.Array,
    ascales: jax.Array,
    qweight: jax.Array,
    wscales: jax.Array,
    lora_act: jax.Array,
    lora_up: jax.Array,
    bias: jax.Array | None,
    *,
    group_size: int = GROUP_SIZE,
    unsigned_acts: bool = False,
    apply_gelu: bool = False,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
  """Kernel 2: the W4A4 product with per-group rescale, low-rank up-projection, bias, GELU.

  Args:
    codes: (M, K // 2) uint8 packed activation codes.
    ascales: (M, G) float32 activation scales, G = K // group_size.
    qweight: (N, K // 2) uint8 packed signed INT4 weight codes.
    wscales: (G, N) weight scales (bf16 or f32; used in f32).
    lora_act: (M, r) x @ lora_down, used in f32 (the kernel keeps ~16 bits of it, see api.py).
    lora_up: (r, N) bfloat16.
    bias: (N,) float32 or None.
    group_size: quantization group along K.
    unsigned_acts: activation codes are unsigned [0, 15] (shifted activations).
    apply_gelu: apply tanh-approximated GELU after the bias.
    out_dtype: output dtype.

  Returns:
    (M, N) out_dtype: sum_g ascales[:, g] * wscales[g] * int32_group_sum(g), accumulated in f32 in
    group order, plus lora_act @ lora_up in f32, plus bias.
  """
  m = codes.shape[0]
  n = qweight.shape[0]
  groups = ascales.shape[1]
  qa = unpack_int4(codes, unsigned=unsigned_acts).reshape(m, groups, group_size)
  qw = unpack_int4(qweight).reshape(n, groups, group_size)
  wsc = wscales.astype(jnp.float32)

  def add_group(acc, g):
    part = jnp.dot(qa[:, g], qw[:, g].T, preferred_element_type=jnp.int32)
    return acc + part.astype(jnp.float32) * (ascales[:, g][:, None] * wsc[g][None, :]), None

  acc, _ = lax.scan(add_group, jnp.zeros((m, n), jnp.float32), jnp.arange(groups))
  lora = jnp.dot(lora_act.astype(jnp.float32), lora_up.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  y = acc + lora
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  if apply_gelu:
    y = jax.nn.gelu(y, approximate=True)
  return y.astype(out_dtype)


def svdq_linear_reference(
    x: jax.Array,
    qweight: jax.Array,
    wscales: jax.Array,
    smooth: jax.Array,
    lora_down: jax.Array,
    lora_up: jax.Array,
    bias: jax.Array | None,
    *,
    group_size: int = GROUP_SIZE,
    act_shift: float = 0.0,
    apply_gelu: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
  """The whole fused op, kernel 1 then kernel 2, on x (..., K); returns (..., N).

  The result has out_dtype, or x's dtype when out_dtype is None.
  """
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)
  if x2.dtype != jnp.bfloat16:
    x2 = x2.astype(jnp.float32)
  codes, ascales, lora_act = quantize_activations_reference(
      x2, smooth, lora_down, group_size=group_size, act_shift=act_shift)
  y = w4a4_gemm_reference(
      codes, ascales, qweight, wscales, lora_act, lora_up, bias, group_size=group_size,
      unsigned_acts=act_shift != 0.0, apply_gelu=apply_gelu, out_dtype=out_dtype or x.dtype)
  return y.reshape(*lead, qweight.shape[0])
