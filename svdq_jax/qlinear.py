"""`SVDQLinear` (the quantized linear pytree of docs/format.md) and its XLA product `xla_dot`.

`xla_dot` is the reference implementation for any backend (exact integer product per group,
float32 rescale in group order, low-rank branch, biases); `svdq_jax.dot.svdq_dot` chooses between
it and the Pallas kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax import quantizers as qz
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError
from svdq_jax.formats import QuantFormat

FORMAT_VERSION = 2
"""Version of `SVDQLinear.metadata()`. 2: the layer's `QuantFormat` under "format". 1 (still
read): the whole `QuantConfig` under "config" and "act_shift" beside it."""
_ARRAY_FIELDS = ("qweight", "wscales", "wtscale", "wcscales", "smooth", "lora_down", "lora_up",
                 "bias")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SVDQLinear:
  """A quantized linear layer: y = Q(x / smooth) @ Q(R) + (x @ lora_down) @ lora_up + bias.

  Array leaves (docs/format.md): qweight (N, K // 2) uint8 packed 4-bit codes, or (N, K) int8 for
  INT8; wscales (K // group, N) bfloat16 (float8_e4m3fn for NVFP4); wtscale () float32; smooth (K,)
  float32; lora_down (K, r) and lora_up (r, N) bfloat16; bias (N,) float32 or None (the folded
  correction, e.g. the shift compensation; the layer's own bias stays in the layer); wcscales
  (N,) float32 or None, a per-output-channel weight scale on top of wtscale (NVFP4 only; what
  Nunchaku's fused q/k/v linears carry).
  Static: `format` (the `QuantFormat`: formats, group size, act_shift), `in_features`,
  `out_features`.
  """

  qweight: jax.Array
  wscales: jax.Array
  wtscale: jax.Array
  smooth: jax.Array
  lora_down: jax.Array
  lora_up: jax.Array
  bias: jax.Array | None
  format: QuantFormat = dataclasses.field(metadata={"static": True})
  in_features: int = dataclasses.field(metadata={"static": True})
  out_features: int = dataclasses.field(metadata={"static": True})
  wcscales: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, int]:
    """(K, N), the shape of the kernel this layer replaces."""
    return (self.in_features, self.out_features)

  @property
  def rank(self) -> int:
    """Rank r of the low-rank branch (columns of lora_down; 0 without a branch)."""
    return self.lora_down.shape[1]

  @property
  def weight_format(self) -> str:
    return self.format.weight_format

  @property
  def act_format(self) -> str | None:
    return self.format.act_format

  @property
  def group_size(self) -> int:
    return self.format.group_size

  @property
  def act_shift(self) -> float:
    """0.171875 for unsigned shifted INT4 activations, else 0."""
    return self.format.act_shift

  def weight_codes(self) -> jax.Array:
    """Unpacked residual codes (N, K): int8 for INT4/INT8, uint8 patterns for NVFP4/NF4."""
    if self.weight_format == "int8":
      return self.qweight
    return qz.unpack_nibbles(self.qweight, signed=self.weight_format == "int4")

  def dequantize_residual(self) -> jax.Array:
    """The dequantized 4-bit residual in the smoothed domain, (K, N) float32."""
    codes = qz.Quantized(self.weight_codes(), self.wscales.T, self.wtscale)
    residual = qz.dequantize(codes, self.weight_format, self.group_size).T
    if self.wcscales is not None:
      residual = residual * self.wcscales[None, :]
    return residual

  def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The effective kernel (K, N): residual / smooth + lora_down @ lora_up, in `dtype`.

    `x @ dequantize() + bias` is what the layer computes without activation quantization (the
    shift compensation in `bias` cancels against the shift, which only the quantized path sees).
    """
    kernel = self.dequantize_residual() / self.smooth[:, None]
    if self.rank:
      kernel = kernel + self.lora_down.astype(jnp.float32) @ self.lora_up.astype(jnp.float32)
    return kernel.astype(dtype)

  def metadata(self) -> dict[str, Any]:
    """The JSON-serializable static part (for checkpoints, docs/format.md). "has_wcscales" is
    written only when true, so layers without per-channel scales keep their old header."""
    metadata = {"format_version": FORMAT_VERSION, "format": self.format.to_dict(),
                "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "has_bias": self.bias is not None}
    if self.wcscales is not None:
      metadata["has_wcscales"] = True
    return metadata

  def arrays(self) -> dict[str, jax.Array]:
    """The array leaves by field name (None fields absent); inverse of `from_arrays`."""
    return {name: getattr(self, name) for name in _ARRAY_FIELDS
            if getattr(self, name) is not None}

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Any], metadata: Mapping[str, Any], *,
                  device: jax.Device | None = None) -> SVDQLinear:
    """Rebuilds a layer from `arrays()` and `metadata()` (this version's or version 1's),
    checking every shape and dtype. Its arrays go to `device` (None: the default device,
    uncommitted)."""
    k, n = int(metadata["in_features"]), int(metadata["out_features"])
    fmt = metadata_format(metadata)
    expected = expected_shapes(fmt, k, n, int(metadata["rank"]),
                               has_bias=bool(metadata["has_bias"]),
                               has_wcscales=bool(metadata.get("has_wcscales", False)))
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
      raise InputError(f"SVDQLinear.from_arrays: missing arrays {missing}, unexpected {unexpected}")
    leaves = {}
    for name, spec in expected.items():
      value = arrays[name]
      if tuple(value.shape) != spec.shape or np.dtype(value.dtype) != np.dtype(spec.dtype):
        raise InputError(f"SVDQLinear.from_arrays: {name!r} is {value.dtype}{tuple(value.shape)},"
                         f" the metadata needs {np.dtype(spec.dtype)}{spec.shape}")
      leaves[name] = jnp.asarray(value) if device is None else jax.device_put(value, device)
    leaves.setdefault("bias", None)
    leaves.setdefault("wcscales", None)
    return cls(**leaves, format=fmt, in_features=k, out_features=n)


def metadata_format(metadata: Mapping[str, Any]) -> QuantFormat:
  """The `QuantFormat` of a layer's metadata: version 2's "format", or the one version 1's
  "config" (the whole QuantConfig) and "act_shift" give for its in_features."""
  version = metadata.get("format_version")
  if version == FORMAT_VERSION:
    return QuantFormat.from_dict(metadata["format"])
  if version == 1:
    config = QuantConfig.from_dict(metadata["config"])
    return config.layer_format(int(metadata["in_features"]), float(metadata["act_shift"]))
  raise InputError(f"SVDQLinear.from_arrays: format_version {version} is not supported (this "
                   f"svdq-jax reads 1 and {FORMAT_VERSION})")


def expected_shapes(fmt: QuantFormat, in_features: int, out_features: int, rank: int, *,
                    has_bias: bool, has_wcscales: bool = False
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of an SVDQLinear's arrays (docs/format.md), e.g. for `jax.eval_shape`."""
  k, n = in_features, out_features
  group = fmt.group_size
  if k % group:
    raise ValueError(f"expected_shapes: {k} input features are not a multiple of the group size "
                     f"{group}")
  if has_wcscales and fmt.weight_format != "nvfp4":
    raise ValueError(f"expected_shapes: per-channel wcscales are NVFP4 only, not "
                     f"{fmt.weight_format}")
  weight = fmt.weight_format
  qweight = ((n, k), jnp.int8) if weight == "int8" else ((n, k // 2), jnp.uint8)
  shapes = {
      "qweight": qweight,
      "wscales": ((k // group, n), qz.WEIGHT_SCALE_DTYPE[weight]),
      "wtscale": ((), jnp.float32),
      "smooth": ((k,), jnp.float32),
      "lora_down": ((k, rank), jnp.bfloat16),
      "lora_up": ((rank, n), jnp.bfloat16),
  }
  if has_bias:
    shapes["bias"] = ((n,), jnp.float32)
  if has_wcscales:
    shapes["wcscales"] = ((n,), jnp.float32)
  return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}


def split_outputs(layer: SVDQLinear, sizes: tuple[int, ...]) -> list[SVDQLinear]:
  """A layer as layers over consecutive output slices of `sizes` channels, exactly (y of each part
  is its slice of y): the codes, scales, up factor, bias and wcscales are sliced; smooth, wtscale
  and the down factor are shared. Splits a fused q/k/v layer (Nunchaku's `qkv_proj`, or one
  quantized with `QuantConfig.fused`) into its parts."""
  if sum(sizes) != layer.out_features:
    raise ValueError(f"split_outputs: sizes {sizes} do not add up to {layer.out_features}")
  parts, start = [], 0
  for size in sizes:
    cols = slice(start, start + size)
    parts.append(dataclasses.replace(
        layer, qweight=layer.qweight[cols], wscales=layer.wscales[:, cols],
        lora_up=layer.lora_up[:, cols], bias=None if layer.bias is None else layer.bias[cols],
        wcscales=None if layer.wcscales is None else layer.wcscales[cols], out_features=size))
    start += size
  return parts


def is_quantized(x: Any) -> bool:
  """True for an `SVDQLinear` (a quantized kernel), False for anything else."""
  return isinstance(x, SVDQLinear)


def quantize_activations(x: jax.Array, w: SVDQLinear) -> tuple[jax.Array, jax.Array]:
  """Dynamic per-token activation quantization of the 4-/8-bit path (docs/format.md).

  x: (M, K) any float. Returns codes (M, K) int8 (for NVFP4: the E2M1 bit patterns as uint8) and
  scales (M, K // group) float32, for xs = (x + act_shift) / smooth.
  """
  fmt = w.format.act_code_format
  xs = (x.astype(jnp.float32) + w.act_shift) / w.smooth
  q = qz.quantize(xs, fmt, w.group_size, scale_dtype=qz.ACT_SCALE_DTYPE[fmt], tensor_scale=1.0)
  return q.codes, q.scales.astype(jnp.float32)


def _integer_operand(codes: jax.Array, fmt: str) -> tuple[jax.Array, float]:
  """Codes as int8 integers whose products are exact, and the factor that restores the values.

  INT: the codes themselves. NVFP4: twice the E2M1 value (an integer in [-12, 12]), factor 1/2.
  """
  if fmt == "nvfp4":
    twice = jnp.asarray((2 * qz.E2M1_VALUES).astype(np.int8))
    return twice[codes.astype(jnp.int32)], 0.5
  return codes.astype(jnp.int8), 1.0


def grouped_integer_product(qx: jax.Array, ascales: jax.Array, qw: jax.Array, wscales: jax.Array,
                            group_size: int, value_scale: float = 1.0) -> jax.Array:
  """sum_g (ascales[:, g] * wscales[g]) * (int32 group dot * value_scale), accumulated g = 0, 1...

  qx (M, K) int8, ascales (M, G) float32, qw (N, K) int8, wscales (G, N) float32 -> (M, N) float32.
  Each group dot is exact in int32 (XLA CPU cannot dot int4, so codes are widened to int8);
  `value_scale` is a power of two (exact).
  """
  m, k = qx.shape
  n = qw.shape[0]
  groups = k // group_size
  qx_g = qx.reshape(m, groups, group_size).transpose(1, 0, 2)
  qw_g = qw.reshape(n, groups, group_size).transpose(1, 0, 2)

  def add_group(acc, operands):
    qx_block, qw_block, ascale, wscale = operands
    psum = jax.lax.dot_general(qx_block, qw_block, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
    scale = ascale[:, None] * wscale[None, :]
    return acc + scale * (psum.astype(jnp.float32) * value_scale), None

  acc, _ = jax.lax.scan(add_group, jnp.zeros((m, n), jnp.float32),
                        (qx_g, qw_g, ascales.T, wscales.astype(jnp.float32)))
  return acc


def xla_dot(x: jax.Array, w: SVDQLinear, bias: jax.Array | None = None) -> jax.Array:
  """The reference product for any backend: x (..., K) -> (..., N) in x's dtype.

  Quantized activations: exact grouped integer product rescaled in float32, times wtscale (and
  the per-channel wcscales, when present), plus the float32 low-rank branch
  (x @ lora_down) @ lora_up, plus both biases. Weight-only (W4A16): x @ dequantize() in x's
  dtype, plus both biases.
  """
  lead = x.shape[:-1]
  # The barrier keeps the weights' unpacking and dequantization after this layer's input exists:
  # without it XLA may schedule them for every layer of a model at once (a copy of the model).
  x2, w = jax.lax.optimization_barrier((x.reshape(-1, w.in_features), w))
  if w.act_format is None:
    y = jnp.matmul(x2, w.dequantize(x.dtype), preferred_element_type=jnp.float32)
  else:
    qx, ascales = quantize_activations(x2, w)
    ax, a_factor = _integer_operand(qx, w.act_format)
    aw, w_factor = _integer_operand(w.weight_codes(), w.weight_format)
    y = grouped_integer_product(ax, ascales, aw, w.wscales, w.group_size, a_factor * w_factor)
    y = y * w.wtscale
    if w.wcscales is not None:
      y = y * w.wcscales
    if w.rank:
      lora_act = x2.astype(jnp.float32) @ w.lora_down.astype(jnp.float32)
      y = y + lora_act @ w.lora_up.astype(jnp.float32)
  if w.bias is not None:
    y = y + w.bias.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype).reshape(*lead, w.out_features)
