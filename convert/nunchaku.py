"""One Nunchaku quantized linear <-> our `SVDQLinear`, exactly (numpy only).

Nunchaku (and DeepCompressor, which writes its files) stores every tensor of a W4A4 linear in the
per-lane order of its MMA kernels (notes/nunchaku.md section 3.4). `unpack_linear` inverts those
tile permutations and returns our layer (docs/format.md) with the same integer codes, scales,
smoothing factor, low-rank factors and bias; `pack_linear` is the reverse and writes what
DeepCompressor's packer writes for the same values, byte for byte. `unpack_w4a16` / `pack_w4a16`
do the same for the AWQ (TinyChat) W4A16 linears of the AdaLN modulations.

Tensor names: Nunchaku's current modules call them `qweight`, `wscales`, `wtscale`, `wcscales`,
`bias`, `smooth_factor`, `smooth_factor_orig`, `proj_down`, `proj_up`; DeepCompressor (and the
FLUX files, which Nunchaku's loader renames) call the last four `smooth`, `smooth_orig`,
`lora_down`, `lora_up`. Both are read; `pack_linear(naming=...)` writes either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from convert.safetensors_io import CheckpointError, CheckpointReader, TensorSpec
from svdq_jax import quantizers as qz
from svdq_jax.formats import QuantFormat
from svdq_jax.qlinear import SVDQLinear, split_outputs

TILE = 128  # Nunchaku pads in and out features to multiples of this (its warp_n and 2 x 64 K)
LORA_TILE = 16  # the low-rank factors are packed in 16 x 16 tiles; the rank is padded to 16
INT4_GROUP = 64
NVFP4_GROUP = 16
AWQ_GROUP = 64
GELU_SHIFT = qz.GELU_SHIFT  # the act_shift of layers Nunchaku runs on unsigned shifted inputs

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
MODEL_DTYPES = (BF16, np.dtype(np.float16))

# DeepCompressor's (and the FLUX files') name -> Nunchaku's current name.
CURRENT_NAMES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig",
                 "lora_down": "proj_down", "lora_up": "proj_up"}
NAMINGS = ("current", "deepcompressor")


def _pad(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# --- tile permutations (notes/nunchaku.md 3.4). Each pack is a reshape + transpose of the logical
# array; each unpack is the inverse transpose. Index names: n/k = output/input channel, t = 128-wide
# tile, g = scale group.

def pack_qweight(codes: np.ndarray) -> np.ndarray:
  """4-bit codes (N, K) (nibbles, uint8 0..15), N and K multiples of 128 -> int8 (N, K // 2).

  n = nt*128 + np*16 + ns*8 + nl, k = kt*64 + ks*32 + kl*8 + r; stored in the order
  (nt, kt, np, nl, kl, ns, ks, r), eight nibbles per little-endian uint32, r at bits 4r.
  """
  n, k = codes.shape
  tiles = codes.astype(np.uint8).reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8)
  flat = tiles.transpose(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1)
  return (flat[0::2] | (flat[1::2] << 4)).view(np.int8).reshape(n, k // 2)


def unpack_qweight(qweight: np.ndarray) -> np.ndarray:
  """Inverse of `pack_qweight`: int8 (N, K // 2) -> nibbles (N, K) uint8."""
  n, k = qweight.shape[0], qweight.shape[1] * 2
  packed = np.ascontiguousarray(qweight).view(np.uint8).reshape(-1)
  flat = np.stack([packed & 0xF, packed >> 4], axis=-1)
  tiles = flat.reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 8)
  return tiles.transpose(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)


def pack_scales(scales: np.ndarray) -> np.ndarray:
  """16-bit per-group scales (G, N) (or a vector (N,): bias, smooth, wcscales) -> the same shape.

  n = t*128 + a*16 + b*8 + c*2 + d; stored in the order (t, g, a, c, b, d).
  """
  vector = scales.ndim == 1
  s = scales[None] if vector else scales
  g, n = s.shape
  packed = s.T.reshape(n // 128, 8, 2, 4, 2, g).transpose(0, 5, 1, 3, 2, 4).reshape(g, n)
  return packed[0] if vector else packed


def unpack_scales(packed: np.ndarray) -> np.ndarray:
  """Inverse of `pack_scales`."""
  vector = packed.ndim == 1
  p = packed[None] if vector else packed
  g, n = p.shape
  scales = p.reshape(n // 128, g, 8, 4, 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(n, g).T
  return scales[0] if vector else scales


def pack_micro_scales(scales: np.ndarray) -> np.ndarray:
  """NVFP4 group-16 scales (G, N) float8_e4m3fn -> the same shape.

  n = t*128 + s*32 + q*8 + r, g = kc*4 + j; stored in the order (t, kc, r, q, s, j).
  """
  g, n = scales.shape
  return scales.T.reshape(n // 128, 4, 4, 8, g // 4, 4).transpose(0, 4, 3, 2, 1, 5).reshape(g, n)


def unpack_micro_scales(packed: np.ndarray) -> np.ndarray:
  """Inverse of `pack_micro_scales`."""
  g, n = packed.shape
  return packed.reshape(n // 128, g // 4, 8, 4, 4, 4).transpose(0, 4, 3, 2, 1, 5).reshape(n, g).T


def pack_lowrank(weight: np.ndarray, *, down: bool) -> np.ndarray:
  """A low-rank factor in torch layout, down (R, K) or up (N, R), R, K, N multiples of 16 ->
  Nunchaku's (K, R) / (N, R).

  In 16 x 16 tiles (cp over K or N, rp over R), each tile (x: 16, y: 16) with x = ns*8 + nl,
  y = ks*8 + kl*2 + e, stored in the order (cp, rp, nl, kl, ns, ks, e); x is the rank for down and
  the output channel for up.
  """
  if down:
    r, c = weight.shape
    tiles = weight.reshape(r // 16, 16, c // 16, 16).transpose(2, 0, 1, 3)
  else:
    c, r = weight.shape
    tiles = weight.reshape(c // 16, 16, r // 16, 16).transpose(0, 2, 1, 3)
  tiles = tiles.reshape(c // 16, r // 16, 2, 8, 2, 4, 2).transpose(0, 1, 3, 5, 2, 4, 6)
  return tiles.reshape(c, r)


def unpack_lowrank(packed: np.ndarray, *, down: bool) -> np.ndarray:
  """Inverse of `pack_lowrank`: (K, R) -> down (R, K), or (N, R) -> up (N, R)."""
  c, r = packed.shape
  tiles = packed.reshape(c // 16, r // 16, 8, 4, 2, 2, 2).transpose(0, 1, 4, 2, 5, 3, 6)
  tiles = tiles.reshape(c // 16, r // 16, 16, 16)
  if down:
    return tiles.transpose(1, 2, 0, 3).reshape(r, c)
  return tiles.transpose(0, 2, 1, 3).reshape(c, r)


def pack_awq(codes: np.ndarray) -> np.ndarray:
  """TinyChat W4A16 packing: codes (N, K) uint8 0..15, N % 4 == 0, K % 64 == 0 -> int32 (N/4, K/2).

  Per row and 32-column chunk, 16-bit word j holds columns j, j+8, j+16, j+24 (nibbles 0..3); the
  words of 4 consecutive rows are interleaved per 64-column chunk.
  """
  n, k = codes.shape
  nib = codes.astype(np.uint16).reshape(n, k // 32, 4, 8)
  words = nib[:, :, 0] | (nib[:, :, 1] << 4) | (nib[:, :, 2] << 8) | (nib[:, :, 3] << 12)
  words = words.reshape(n // 4, 4, k // 64, 16).transpose(0, 2, 1, 3).reshape(n // 4, k)
  return np.ascontiguousarray(words).view(np.int32)


def unpack_awq(qweight: np.ndarray) -> np.ndarray:
  """Inverse of `pack_awq`: int32 (N/4, K/2) -> codes (N, K) uint8 0..15."""
  n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
  words = np.ascontiguousarray(qweight).view(np.uint16).reshape(n // 4, k // 64, 4, 16)
  words = words.transpose(0, 2, 1, 3).reshape(n, k // 32, 8)
  nib = (words[..., None] >> (4 * np.arange(4, dtype=np.uint16))) & 0xF
  return nib.transpose(0, 1, 3, 2).reshape(n, k).astype(np.uint8)


def awq_groups(in_features: int) -> int:
  """Rows of TinyChat's scale and zero tensors for group 64: K / 64 rounded up to a multiple of 16
  (zero-filled), as DeepCompressor's `ceil_num_groups`."""
  return _pad(_pad(in_features // AWQ_GROUP, 8) // 8, 2) * 8


# --- layer level


def _layer_error(name: str, message: str) -> CheckpointError:
  return CheckpointError(f"{name}: {message}")


def _canonical(tensors: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """The tensors under DeepCompressor's names; both spellings of one tensor is an error."""
  reverse = {v: k for k, v in CURRENT_NAMES.items()}
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    canon = reverse.get(key, key)
    if canon in out:
      raise _layer_error(name, f"has both {canon!r} and {CURRENT_NAMES[canon]!r}")
    out[canon] = value
  return out


def _need(tensors: dict[str, np.ndarray], key: str, name: str, shape: tuple[int, ...],
          dtypes: tuple[np.dtype, ...]) -> np.ndarray:
  shown = CURRENT_NAMES.get(key, key)
  if key not in tensors:
    raise _layer_error(name, f"missing tensor {shown!r}")
  value = np.asarray(tensors[key])
  if tuple(value.shape) != shape or np.dtype(value.dtype) not in dtypes:
    want = " or ".join(np.dtype(d).name for d in dtypes)
    raise _layer_error(name, f"tensor {shown!r} is {np.dtype(value.dtype).name}"
                       f"{tuple(value.shape)}, expected {want}{shape}")
  return value


def _as_bf16_exactly(value: np.ndarray, what: str, name: str) -> np.ndarray:
  """A 16-bit tensor as bf16, refusing a value bf16 cannot hold (fp16 checkpoints)."""
  out = value.astype(BF16)
  if not np.array_equal(out.astype(np.float32), value.astype(np.float32), equal_nan=True):
    raise _layer_error(name, f"{what} ({np.dtype(value.dtype).name}) has values bfloat16 cannot "
                       "represent exactly; only bfloat16 checkpoints import exactly")
  return out


def w4a4_format(weight_format: str, act_shift: float = 0.0) -> QuantFormat:
  """The `QuantFormat` of an imported W4A4 layer: "int4" (group 64) or "nvfp4" (group 16)."""
  group = INT4_GROUP if weight_format == "int4" else NVFP4_GROUP
  return QuantFormat(weight_format, weight_format, group, act_shift)


def w4a16_format() -> QuantFormat:
  """The `QuantFormat` of an imported W4A16 (AdaLN) layer: INT4 g64 weight-only."""
  return QuantFormat("int4", None, AWQ_GROUP)


def linear_precision(tensors: dict[str, np.ndarray], name: str = "linear") -> str:
  """"int4" or "nvfp4": the weight format of a W4A4 linear, from its `wscales` dtype."""
  scales = tensors.get("wscales")
  if scales is None:
    raise _layer_error(name, "missing tensor 'wscales'")
  dtype = np.dtype(scales.dtype)
  if dtype == FP8:
    return "nvfp4"
  if dtype in MODEL_DTYPES:
    return "int4"
  raise _layer_error(name, f"'wscales' has dtype {dtype.name}; expected bfloat16/float16 (INT4) "
                     "or float8_e4m3fn (NVFP4)")


def unpack_linear(tensors: dict[str, np.ndarray], *, act_shift: float = 0.0,
                  in_features: int | None = None, out_features: int | None = None,
                  has_bias: bool = True, name: str = "linear") -> SVDQLinear:
  """Our `SVDQLinear` from one Nunchaku W4A4 linear's tensors, with no value rounded.

  Args:
    tensors: the layer's tensors by name (current or DeepCompressor names, see the module
      docstring), numpy arrays as stored: qweight int8 (N, K/2); wscales (K/64, N) bf16 (INT4) or
      (K/16, N) float8_e4m3fn (NVFP4); bias (N,); smooth (K,) (the runtime factor; `smooth_orig`
      is ignored); optional lora_down (K, R) / lora_up (N, R); NVFP4 also wtscale (1,) and/or
      wcscales (N,) (a per-channel scale, permuted like the bias; DeepCompressor writes it for
      fused q/k/v linears whose parts have different tensor scales).
    act_shift: 0.171875 for layers Nunchaku runs on unsigned shifted activations (the INT4 MLP
      down-projections); their bias already holds the shift compensation.
    in_features, out_features: the layer's true shape when Nunchaku padded it to multiples of
      128 (default: the stored, padded one); the padding is cut off.
    has_bias: False for a linear Nunchaku builds without a bias (SDXL's attention q/k/v): then
      the tensors hold no 'bias' and the layer's `bias` is None.
    name: the layer's name in error messages.

  Returns:
    The layer; `bias` (float32) is the whole bias Nunchaku adds (the layer's own included), so the
    model's own bias for this layer must be zero.

  Raises:
    CheckpointError naming the layer and tensor for a missing, misshapen or unsupported tensor.
  """
  t = _canonical(tensors, name)
  fmt = linear_precision(t, name)
  qweight = t.get("qweight")
  if qweight is None:
    raise _layer_error(name, "missing tensor 'qweight'")
  if qweight.ndim != 2 or np.dtype(qweight.dtype) != np.int8:
    raise _layer_error(name, f"tensor 'qweight' is {np.dtype(qweight.dtype).name}"
                       f"{tuple(qweight.shape)}, expected int8 (N, K/2)")
  n_pad, k_pad = qweight.shape[0], qweight.shape[1] * 2
  if n_pad % TILE or k_pad % TILE:
    raise _layer_error(name, f"'qweight' {tuple(qweight.shape)} is not padded to multiples of "
                       f"{TILE} (N, K)")
  k = k_pad if in_features is None else in_features
  n = n_pad if out_features is None else out_features
  if not (0 < k <= k_pad and 0 < n <= n_pad and _pad(k, TILE) == k_pad
          and _pad(n, TILE) == n_pad):
    raise _layer_error(name, f"in/out features ({k}, {n}) do not pad to the stored ({k_pad}, "
                       f"{n_pad})")
  group = INT4_GROUP if fmt == "int4" else NVFP4_GROUP
  if k % group:
    raise _layer_error(name, f"in_features {k} is not a multiple of the group size {group}")
  scales = _need(t, "wscales", name, (k_pad // group, n_pad),
                 MODEL_DTYPES if fmt == "int4" else (FP8,))
  if has_bias:
    bias = _need(t, "bias", name, (n_pad,), MODEL_DTYPES)
  elif "bias" in t:
    raise _layer_error(name, "unexpected tensor 'bias' (this linear has none)")
  smooth = _need(t, "smooth", name, (k_pad,), MODEL_DTYPES)
  if ("lora_down" in t) != ("lora_up" in t):
    raise _layer_error(name, "has only one of the low-rank factors 'proj_down' / 'proj_up'")
  rank = t["lora_down"].shape[-1] if "lora_down" in t and t["lora_down"].ndim == 2 else 0
  if "lora_down" in t:
    down = _need(t, "lora_down", name, (k_pad, rank), MODEL_DTYPES)
    up = _need(t, "lora_up", name, (n_pad, rank), MODEL_DTYPES)
    if rank % LORA_TILE:
      raise _layer_error(name, f"rank {rank} is not a multiple of {LORA_TILE}")
  else:
    down = np.zeros((k_pad, 0), BF16)
    up = np.zeros((n_pad, 0), BF16)
  wtscale = np.float32(1.0)
  wcscales = None
  if fmt == "nvfp4":
    if "wtscale" in t:
      wt = _need(t, "wtscale", name, (1,), (*MODEL_DTYPES, np.dtype(np.float32)))
      wtscale = np.float32(wt.astype(np.float32)[0])
    if "wcscales" in t:
      wc = _need(t, "wcscales", name, (n_pad,), MODEL_DTYPES)
      wcscales = np.ascontiguousarray(unpack_scales(wc)[:n].astype(np.float32))
  elif "wtscale" in t or "wcscales" in t:
    raise _layer_error(name, "INT4 layer with NVFP4 tensor scales 'wtscale'/'wcscales'")

  codes = unpack_qweight(qweight)[:n, :k]
  if fmt == "int4":
    group_scales = _as_bf16_exactly(unpack_scales(scales)[: k // group, :n], "'wscales'", name)
  else:
    group_scales = unpack_micro_scales(scales)[: k // group, :n]
  lora_down = unpack_lowrank(down, down=True).T[:k] if rank else down[:k]
  lora_up = unpack_lowrank(up, down=False)[:n].T if rank else up[:n].T
  return SVDQLinear(
      qweight=np.asarray(qz.pack_nibbles(codes)),
      wscales=np.ascontiguousarray(group_scales),
      wtscale=np.asarray(wtscale, np.float32),
      smooth=unpack_scales(smooth)[:k].astype(np.float32),
      lora_down=np.ascontiguousarray(_as_bf16_exactly(lora_down, "'proj_down'", name)),
      lora_up=np.ascontiguousarray(_as_bf16_exactly(lora_up, "'proj_up'", name)),
      bias=unpack_scales(bias)[:n].astype(np.float32) if has_bias else None,
      format=w4a4_format(fmt, float(act_shift)), in_features=k, out_features=n,
      wcscales=wcscales)


def group_layer_keys(keys: Iterable[str], quantized: Callable[[str], bool]
                     ) -> dict[str, list[str]]:
  """{layer: its keys} of the `keys` for which `quantized(key)` holds; a key's layer is the key
  without its last dotted part ("x.attn.to_qkv.qweight" -> "x.attn.to_qkv")."""
  grouped: dict[str, list[str]] = {}
  for key in keys:
    if quantized(key):
      grouped.setdefault(key.rsplit(".", 1)[0], []).append(key)
  return grouped


def read_layer_tensors(reader: CheckpointReader, keys_by_layer: dict[str, list[str]], layer: str,
                       *, name: str) -> dict[str, np.ndarray]:
  """{tensor name: array} of one quantized layer (`keys_by_layer` from `group_layer_keys`), as
  `unpack_linear` / `unpack_w4a16` take them.

  Raises:
    CheckpointError when the checkpoint `name` holds no tensor of the layer.
  """
  keys = keys_by_layer.get(layer, [])
  if not keys:
    raise CheckpointError(f"{name}: missing quantized layer {layer!r}")
  return {key[len(layer) + 1:]: reader.get(key) for key in keys}


def layer_arrays(layer: SVDQLinear, paths: Sequence[str], widths: Sequence[int], *,
                 bias: bool = True) -> dict[str, SVDQLinear | np.ndarray]:
  """Our flat parameters of an unpacked layer: `<path>/kernel` for each of our linears `paths`
  (several: the layer split along its output into `widths`, as a fused q/k/v), and with `bias` a
  zero `<path>/bias` (N,) bf16 (the SVDQLinear holds the whole bias)."""
  parts = split_outputs(layer, tuple(widths)) if len(paths) > 1 else [layer]
  arrays: dict[str, SVDQLinear | np.ndarray] = {}
  for path, part in zip(paths, parts, strict=True):
    arrays[f"{path}/kernel"] = part
    if bias:
      arrays[f"{path}/bias"] = np.zeros((part.out_features,), BF16)
  return arrays


def _host(x) -> np.ndarray:
  return np.asarray(x)


def pack_linear(layer: SVDQLinear, *, bias: np.ndarray | None = None, dtype=BF16,
                naming: str = "current") -> dict[str, np.ndarray]:
  """Nunchaku's tensors for one of our W4A4 layers: the inverse of `unpack_linear`.

  What DeepCompressor's `convert_to_nunchaku_w4x4y16_linear_state_dict` writes for the same
  values, byte for byte: qweight int8 (N', K'/2), wscales (K'/64, N') (INT4, `dtype`) or
  (K'/16, N') float8_e4m3fn (NVFP4), bias (N') and smooth / smooth_orig (K') in `dtype`,
  lora_down (K', R') and lora_up (N', R') in `dtype`, NVFP4 wtscale (1,) in `dtype` (left out,
  as DeepCompressor does, when the layer has per-channel wcscales (N',) and wtscale 1); N', K' are
  padded to multiples of 128 and R' to 16 as DeepCompressor pads them (codes and factors with
  zeros, scales, smooth and bias with ones).

  Args:
    layer: an INT4 or NVFP4 W4A4 SVDQLinear.
    bias: the layer's own bias (N,), added to `layer.bias`; Nunchaku has one bias per linear.
    dtype: the model dtype of the 16-bit tensors (bfloat16 or float16).
    naming: "current" (smooth_factor, proj_down, ...) or "deepcompressor" (smooth, lora_down, ...,
      what FLUX files hold).

  Values are rounded only where Nunchaku stores fewer bits than we do: the float32 bias and
  smoothing factor (and the NVFP4 wtscale and wcscales) to `dtype`; an NVFP4 code -0 becomes +0
  (the same value; DeepCompressor's codebook search never yields -0).

  Raises:
    CheckpointError for a layer Nunchaku cannot hold (weight-only, INT8, NF4, group size, an odd
    in_features).
  """
  if naming not in NAMINGS:
    raise ValueError(f"pack_linear: naming {naming!r} is not one of {NAMINGS}")
  fmt, act = layer.weight_format, layer.act_format
  if fmt not in ("int4", "nvfp4") or act != fmt:
    raise CheckpointError(f"pack_linear: Nunchaku holds INT4 or NVFP4 W4A4 layers, not weights "
                          f"{fmt} / activations {act}")
  group = INT4_GROUP if fmt == "int4" else NVFP4_GROUP
  if layer.group_size != group:
    raise CheckpointError(f"pack_linear: {fmt} needs group size {group}, got {layer.group_size}")
  dtype = np.dtype(dtype)
  k, n, rank = layer.in_features, layer.out_features, layer.rank
  k_pad, n_pad, r_pad = _pad(k, TILE), _pad(n, TILE), _pad(rank, LORA_TILE)
  codes = np.zeros((n_pad, k_pad), np.uint8)
  codes[:n, :k] = np.asarray(qz.unpack_nibbles(_host(layer.qweight), signed=False))
  if fmt == "nvfp4":
    codes[codes == 8] = 0
  scales = np.ones((k_pad // group, n_pad), BF16 if fmt == "nvfp4" else dtype)
  scales[: k // group, :n] = _host(layer.wscales).astype(scales.dtype)
  total_bias = np.zeros((n,), np.float32)
  for part in (layer.bias, bias):
    if part is not None:
      total_bias = total_bias + _host(part).astype(np.float32)
  bias_out = np.ones((n_pad,), dtype)
  bias_out[:n] = total_bias.astype(dtype)
  smooth = np.ones((k_pad,), dtype)
  smooth[:k] = _host(layer.smooth).astype(dtype)
  out: dict[str, np.ndarray] = {"qweight": pack_qweight(codes)}
  if fmt == "int4":
    out["wscales"] = pack_scales(scales)
  else:
    out["wscales"] = pack_micro_scales(scales.astype(FP8))
    if layer.wcscales is not None:
      channel = np.ones((n_pad,), dtype)
      channel[:n] = _host(layer.wcscales).astype(dtype)
      out["wcscales"] = pack_scales(channel)
    if layer.wcscales is None or float(layer.wtscale) != 1.0:
      out["wtscale"] = np.asarray(_host(layer.wtscale), np.float32).astype(dtype).reshape(1)
  out["bias"] = pack_scales(bias_out)
  out["smooth_orig"] = pack_scales(smooth)
  out["smooth"] = out["smooth_orig"].copy()
  if rank:
    down = np.zeros((r_pad, k_pad), dtype)
    down[:rank, :k] = _host(layer.lora_down).T.astype(dtype)
    up = np.zeros((n_pad, r_pad), dtype)
    up[:n, :rank] = _host(layer.lora_up).T.astype(dtype)
    out["lora_down"] = pack_lowrank(down, down=True)
    out["lora_up"] = pack_lowrank(up, down=False)
  if naming == "current":
    out = {CURRENT_NAMES.get(key, key): value for key, value in out.items()}
  return out


def linear_specs(layer: SVDQLinear, *, dtype=BF16, naming: str = "current"
                 ) -> dict[str, TensorSpec]:
  """The names, dtypes and shapes of what `pack_linear(layer, dtype=dtype, naming=naming)`
  returns, without packing anything (a file's header is written before its tensors)."""
  dtype = np.dtype(dtype)
  fmt = layer.weight_format
  group = INT4_GROUP if fmt == "int4" else NVFP4_GROUP
  k_pad, n_pad = _pad(layer.in_features, TILE), _pad(layer.out_features, TILE)
  specs = {"qweight": TensorSpec(np.dtype(np.int8), (n_pad, k_pad // 2)),
           "wscales": TensorSpec(dtype if fmt == "int4" else FP8, (k_pad // group, n_pad))}
  if fmt == "nvfp4" and layer.wcscales is not None:
    specs["wcscales"] = TensorSpec(dtype, (n_pad,))
  if fmt == "nvfp4" and (layer.wcscales is None or float(layer.wtscale) != 1.0):
    specs["wtscale"] = TensorSpec(dtype, (1,))
  specs |= {"bias": TensorSpec(dtype, (n_pad,)), "smooth_orig": TensorSpec(dtype, (k_pad,)),
            "smooth": TensorSpec(dtype, (k_pad,))}
  if layer.rank:
    r_pad = _pad(layer.rank, LORA_TILE)
    specs |= {"lora_down": TensorSpec(dtype, (k_pad, r_pad)),
              "lora_up": TensorSpec(dtype, (n_pad, r_pad))}
  if naming == "current":
    specs = {CURRENT_NAMES.get(key, key): spec for key, spec in specs.items()}
  return specs


def concat_outputs(layers: list[SVDQLinear]) -> SVDQLinear:
  """The inverse of `svdq_jax.qlinear.split_outputs`: layers over consecutive output slices
  (q, k, v) as one layer, exactly. They must share the format, smoothing factor and `lora_down`
  (what `QuantConfig.fused` or an import gives). Per-tensor NVFP4 scales that differ become
  per-channel `wcscales` (wtscale 1), as DeepCompressor fuses q/k/v.

  Raises:
    CheckpointError saying what the parts do not share.
  """
  first = layers[0]
  for part in layers[1:]:
    if (part.format, part.in_features, part.rank) != (first.format, first.in_features,
                                                       first.rank):
      raise CheckpointError("the parts differ in format, in_features or rank")
    if not np.array_equal(_host(part.smooth), _host(first.smooth)):
      raise CheckpointError("the parts have different smoothing factors")
    if not np.array_equal(_host(part.lora_down), _host(first.lora_down)):
      raise CheckpointError("the parts have different low-rank down projections (lora_down)")
  tensor_scales = [float(part.wtscale) for part in layers]
  channel = [None if part.wcscales is None else _host(part.wcscales).astype(np.float32)
             for part in layers]
  wtscale, wcscales = tensor_scales[0], None
  if len(set(tensor_scales)) > 1:
    if any(c is not None for c in channel):
      raise CheckpointError("the parts have different tensor scales and per-channel wcscales")
    wtscale = 1.0
    wcscales = np.concatenate([np.full((p.out_features,), t, np.float32)
                               for p, t in zip(layers, tensor_scales, strict=True)])
  elif any(c is not None for c in channel):
    wcscales = np.concatenate([np.ones((p.out_features,), np.float32) if c is None else c
                               for p, c in zip(layers, channel, strict=True)])
  bias = None
  if any(part.bias is not None for part in layers):
    bias = np.concatenate([np.zeros((p.out_features,), np.float32) if p.bias is None
                           else _host(p.bias).astype(np.float32) for p in layers])
  return SVDQLinear(
      qweight=np.concatenate([_host(p.qweight) for p in layers]),
      wscales=np.concatenate([_host(p.wscales) for p in layers], axis=1),
      wtscale=np.asarray(wtscale, np.float32), smooth=_host(first.smooth),
      lora_down=_host(first.lora_down),
      lora_up=np.concatenate([_host(p.lora_up) for p in layers], axis=1), bias=bias,
      format=first.format, in_features=first.in_features,
      out_features=sum(p.out_features for p in layers), wcscales=wcscales)


# --- W4A16 (AWQ / TinyChat), the AdaLN modulation linears


def _adanorm_order(n: int, splits: int) -> np.ndarray:
  """stored[order] = original: original row s*D + d is stored at row d*splits + s."""
  return np.arange(n).reshape(n // splits, splits).T.reshape(-1)


def _adanorm_delta(n: int, splits: int) -> np.ndarray:
  """The +1 DeepCompressor adds to the bias of the scale chunks (1 and splits - 2)."""
  delta = np.zeros((splits, n // splits), np.float32)
  if splits > 1:
    delta[1] = delta[splits - 2] = 1.0
  return delta.reshape(-1)


def w4a16_specs(layer: SVDQLinear, *, dtype=BF16) -> dict[str, TensorSpec]:
  """The names, dtypes and shapes of what `pack_w4a16(layer, dtype=dtype)` returns."""
  dtype = np.dtype(dtype)
  k, n = layer.in_features, layer.out_features
  rows = awq_groups(k)
  return {"qweight": TensorSpec(np.dtype(np.int32), (n // 4, k // 2)),
          "wscales": TensorSpec(dtype, (rows, n)), "wzeros": TensorSpec(dtype, (rows, n)),
          "bias": TensorSpec(dtype, (n,))}


def unpack_w4a16(tensors: dict[str, np.ndarray], *, adanorm_splits: int = 1,
                 name: str = "linear") -> SVDQLinear:
  """Our INT4 g64 W4A16 `SVDQLinear` from a Nunchaku AWQ linear, computing exactly its weights.

  Nunchaku's weight is `q * wscales + wzeros` with unsigned codes q in [0, 15] and zero points
  `wzeros` (DeepCompressor writes -bf16(7 * scale)). Our W4A16 layout has signed codes and no
  zero point, so the layer holds codes `q - 8` (int4), the same scales, and the per-group offset
  `8 * wscales + wzeros` as a low-rank branch: `lora_down` (K, G) is the 0/1 group indicator,
  `lora_up` (G, N) the offsets (twice that rank, high and low bf16 parts, where one bf16 cannot hold
  an offset). All offsets zero (our own exports) gives rank 0. `dequantize()` then equals
  `q * wscales + wzeros` exactly in float32.

  Args:
    tensors: qweight int32 (N/4, K/2), wscales and wzeros (G', N) (G' = `awq_groups(K)` rows,
      the padding zero), bias (N,).
    adanorm_splits: for an AdaLN linear, its number of chunks (6 for `norm1`, 3 for the single
      blocks' `norm`): Nunchaku interleaves the chunks' output channels and adds 1 to the bias of
      the scale chunks; both are undone, so the layer computes diffusers' modulation vectors.
    name: the layer's name in error messages.

  Raises:
    CheckpointError for a missing or misshapen tensor, or a value our layout cannot hold exactly.
  """
  qweight = tensors.get("qweight")
  if qweight is None:
    raise _layer_error(name, "missing tensor 'qweight'")
  if qweight.ndim != 2 or np.dtype(qweight.dtype) != np.int32:
    raise _layer_error(name, f"tensor 'qweight' is {np.dtype(qweight.dtype).name}"
                       f"{tuple(qweight.shape)}, expected int32 (N/4, K/2)")
  n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
  if k % AWQ_GROUP or n % max(adanorm_splits, 1):
    raise _layer_error(name, f"'qweight' {tuple(qweight.shape)}: K = {k} must be a multiple of "
                       f"{AWQ_GROUP} and N = {n} of {adanorm_splits} chunks")
  groups = k // AWQ_GROUP
  rows = awq_groups(k)
  scales = _need(tensors, "wscales", name, (rows, n), MODEL_DTYPES)[:groups]
  zeros = _need(tensors, "wzeros", name, (rows, n), MODEL_DTYPES)[:groups]
  bias = _need(tensors, "bias", name, (n,), MODEL_DTYPES).astype(np.float32)
  codes = unpack_awq(qweight)
  if adanorm_splits > 1:
    order = _adanorm_order(n, adanorm_splits)
    codes, scales, zeros, bias = codes[order], scales[:, order], zeros[:, order], bias[order]
    delta = _adanorm_delta(n, adanorm_splits)
    unbiased = bias - delta
    if not np.array_equal(unbiased.astype(np.float64) + delta, bias.astype(np.float64)):
      raise _layer_error(name, "'bias' minus the folded AdaLN +1 is not exact in float32")
    bias = unbiased
  scales = _as_bf16_exactly(scales, "'wscales'", name)
  offsets = 8.0 * scales.astype(np.float64) + zeros.astype(np.float64)
  parts = []
  rest = offsets
  while np.any(rest != 0):
    if len(parts) == 2:
      raise _layer_error(name, "'wzeros' offsets need more than two bfloat16 parts")
    part = rest.astype(BF16)
    parts.append(part)
    rest = rest - part.astype(np.float64)
  if parts and not np.array_equal(sum(p.astype(np.float32) for p in parts).astype(np.float64),
                                  offsets):
    raise _layer_error(name, "'wzeros' offsets are not exact in float32")
  indicator = np.repeat(np.eye(groups, dtype=BF16), AWQ_GROUP, axis=0)  # (K, G)
  lora_down = np.concatenate([indicator] * len(parts), axis=1) if parts else np.zeros((k, 0), BF16)
  lora_up = np.concatenate(parts, axis=0) if parts else np.zeros((0, n), BF16)
  signed = codes.astype(np.int8) - 8
  return SVDQLinear(
      qweight=np.asarray(qz.pack_nibbles(signed)), wscales=np.ascontiguousarray(scales),
      wtscale=np.asarray(1.0, np.float32),
      smooth=np.ones((k,), np.float32), lora_down=lora_down, lora_up=lora_up, bias=bias,
      format=w4a16_format(), in_features=k, out_features=n)


def _group_offsets(layer: SVDQLinear) -> np.ndarray:
  """The per-group weight offsets (G, N) float64 of a W4A16 layer's branch (see `unpack_w4a16`);
  zeros without one. Raises CheckpointError for a branch of another form."""
  k, n, groups = layer.in_features, layer.out_features, layer.in_features // AWQ_GROUP
  if not layer.rank:
    return np.zeros((groups, n))
  down = _host(layer.lora_down).astype(np.float64)
  indicator = np.repeat(np.eye(groups), AWQ_GROUP, axis=0)
  if layer.rank % groups or not np.array_equal(down, np.tile(indicator, layer.rank // groups)):
    raise CheckpointError(f"pack_w4a16: a W4A16 layer with a low-rank branch of rank "
                          f"{layer.rank} that is not a per-group offset (K = {k})")
  up = _host(layer.lora_up).astype(np.float64)
  return up.reshape(layer.rank // groups, groups, n).sum(axis=0)


def pack_w4a16(layer: SVDQLinear, *, bias: np.ndarray | None = None, adanorm_splits: int = 1,
               dtype=BF16) -> dict[str, np.ndarray]:
  """Nunchaku's AWQ tensors for one of our INT4 g64 W4A16 layers: the inverse of `unpack_w4a16`.

  Codes c in [-8, 7] are stored as q = c + 8 with zero points -8 * scale (exact in bf16), so any
  layer of ours fits; an imported layer's offsets give its original zero points back. What
  DeepCompressor's `convert_to_nunchaku_w4x16_linear_weight` writes for these values with zero 8:
  qweight int32 (N/4, K/2), wscales and wzeros (`awq_groups(K)`, N) and bias (N,) in `dtype`,
  chunks interleaved and the +1 folded into the scale chunks' bias (rounded to `dtype` first, as
  DeepCompressor adds it in the model dtype).

  Args:
    layer: an INT4 weight-only SVDQLinear with group 64.
    bias: the layer's own bias (N,), added to `layer.bias`.
    adanorm_splits: the AdaLN chunk count (see `unpack_w4a16`), 1 for a plain linear.
    dtype: the model dtype.
  """
  fmt = layer.format
  if fmt.weight_format != "int4" or fmt.act_format is not None or fmt.group_size != AWQ_GROUP:
    raise CheckpointError(f"pack_w4a16: needs an INT4 g64 weight-only layer, got weights "
                          f"{fmt.weight_format} g{fmt.group_size} / activations {fmt.act_format}")
  dtype = np.dtype(dtype)
  k, n = layer.in_features, layer.out_features
  if n % 4 or k % AWQ_GROUP or n % adanorm_splits:
    raise CheckpointError(f"pack_w4a16: shape (K {k}, N {n}) does not fit the AWQ layout")
  codes = np.asarray(qz.unpack_nibbles(_host(layer.qweight), signed=True)).astype(np.int16) + 8
  scales = _host(layer.wscales).astype(np.float64)
  zeros = _group_offsets(layer) - 8.0 * scales
  zeros_out = zeros.astype(dtype)
  if not np.array_equal(zeros_out.astype(np.float64), zeros):
    raise CheckpointError("pack_w4a16: a zero point is not exact in the model dtype")
  total_bias = np.zeros((n,), np.float32)
  for part in (layer.bias, bias):
    if part is not None:
      total_bias = total_bias + _host(part).astype(np.float32)
  bias_out = total_bias.astype(dtype)
  scales_out = scales.astype(dtype)
  if adanorm_splits > 1:
    bias_out = (bias_out.astype(np.float32) + _adanorm_delta(n, adanorm_splits)).astype(dtype)
    stored = np.argsort(_adanorm_order(n, adanorm_splits))
    codes, scales_out, zeros_out, bias_out = (codes[stored], scales_out[:, stored],
                                              zeros_out[:, stored], bias_out[stored])
  rows = awq_groups(k)
  padded = {}
  for key, value in (("wscales", scales_out), ("wzeros", zeros_out)):
    padded[key] = np.zeros((rows, n), dtype)
    padded[key][: k // AWQ_GROUP] = value
  return {"qweight": pack_awq(codes.astype(np.uint8)), **padded, "bias": bias_out}
