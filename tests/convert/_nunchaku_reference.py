"""DeepCompressor's Nunchaku packer (deepcompressor-toolkit, torch) driven with random quantized
layers, and the reference semantics of notes/nunchaku.md 3.5 in numpy: the ground truth of the
Nunchaku tests. Nothing here uses our packer."""

from __future__ import annotations

import dataclasses
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dc_convert = pytest.importorskip("deepcompressor.backend.nunchaku.convert")
dc_utils = pytest.importorskip("deepcompressor.backend.nunchaku.utils")

BF16 = np.dtype(ml_dtypes.bfloat16)
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


@dataclasses.dataclass
class RandomLayer:
  """A random W4A4 layer in logical layouts: codes (N, K) (INT4 values -8..7, or E2M1 bit patterns
  0..15 without -0), scales (G, N) (bf16 for INT4, float8 values for NVFP4), wtscale (NVFP4, a
  bf16 value), bias (N,) bf16, smooth (K,) bf16, down (R, K) bf16 (un-smoothed, acts on x),
  up (N, R) bf16, wcscales (N,) bf16 or None (NVFP4 per-channel scale, then wtscale is 1)."""

  fmt: str
  codes: np.ndarray
  scales: np.ndarray
  wtscale: float
  bias: np.ndarray
  smooth: np.ndarray
  down: np.ndarray
  up: np.ndarray
  wcscales: np.ndarray | None = None

  @property
  def group(self) -> int:
    return 64 if self.fmt == "int4" else 16

  def values(self) -> np.ndarray:
    """The weight values (N, K) float64 the codes stand for (in the smoothed input domain)."""
    v = self.codes.astype(np.float64) if self.fmt == "int4" else E2M1[self.codes]
    s = np.repeat(self.scales.astype(np.float64).T, self.group, axis=1)
    return v * s * self.wtscale * self.channel_scales()[:, None]

  def channel_scales(self) -> np.ndarray:
    """wcscales (N,) float64, ones without them."""
    if self.wcscales is None:
      return np.ones(self.codes.shape[0])
    return self.wcscales.astype(np.float64)


def random_layer(rng: np.random.Generator, k: int, n: int, rank: int, fmt: str = "int4", *,
                 channel_scales: np.ndarray | None = None) -> RandomLayer:
  """A random layer; `channel_scales` (N,) (NVFP4) makes it carry those wcscales (as bf16) and
  wtscale 1, as DeepCompressor's fused q/k/v linears."""
  group = 64 if fmt == "int4" else 16
  if fmt == "int4":
    codes = rng.integers(-8, 8, (n, k)).astype(np.int8)
    scales = (rng.uniform(0.5, 2.0, (k // group, n)) * 1e-2).astype(BF16)
    wtscale = 1.0
  else:
    codes = rng.choice([c for c in range(16) if c != 8], (n, k)).astype(np.uint8)
    scales = rng.uniform(0.05, 400, (k // group, n)).astype(ml_dtypes.float8_e4m3fn)
    wtscale = float(np.float32(rng.uniform(1e-5, 1e-4)).astype(BF16))
  wcscales = None
  if channel_scales is not None:
    wtscale, wcscales = 1.0, np.asarray(channel_scales).astype(BF16)
  return RandomLayer(
      fmt=fmt, codes=codes, scales=scales, wtscale=wtscale,
      bias=rng.normal(0, 0.5, (n,)).astype(BF16),
      smooth=rng.uniform(0.25, 4.0, (k,)).astype(BF16),
      down=(rng.normal(0, 1, (rank, k)) / np.sqrt(k)).astype(BF16),
      up=(rng.normal(0, 1, (n, rank)) * 0.1).astype(BF16), wcscales=wcscales)


def _t(a: np.ndarray, dtype=None):
  a = np.asarray(a)
  if a.dtype == BF16:
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(a)).to(dtype) if dtype else torch.from_numpy(a)


def _numpy(t) -> np.ndarray:
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(BF16)
  if t.dtype == torch.float8_e4m3fn:
    return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
  return t.numpy()


def dc_pack(layer: RandomLayer, *, shift: float | None = None, smooth: bool = True
            ) -> dict[str, np.ndarray]:
  """DeepCompressor's `convert_to_nunchaku_w4x4y16_linear_state_dict` for the layer.

  Its inputs are what DeepCompressor's quantizer hands it: the dequantized weight in bf16 (it
  rounds back to the codes), the scales, the bias, the smoothing factor, the branch with the
  smoothed down projection (it divides by smooth in float64: passed in float64 as down * smooth,
  exactly, so that it gets `down` back) and the activation shift (it adds up @ down @ shift to the
  bias).
  """
  n, k = layer.codes.shape
  g = k // layer.group
  weight = torch.from_numpy(layer.values()).to(torch.bfloat16)
  if layer.fmt == "int4":
    scale, subscale = _t(layer.scales.T.reshape(n, 1, g, 1)), None
  elif layer.wcscales is not None:
    scale = _t(layer.wcscales.reshape(n, 1, 1, 1))
    subscale = _t(layer.scales.astype(np.float32).T.reshape(n, 1, g, 1)).to(torch.bfloat16)
  else:
    scale = torch.tensor([layer.wtscale], dtype=torch.bfloat16)
    subscale = _t(layer.scales.astype(np.float32).T.reshape(n, 1, g, 1)).to(torch.bfloat16)
  lora = None
  smooth_t = _t(layer.smooth) if smooth else None
  if layer.down.shape[0]:
    down = torch.from_numpy(layer.down.astype(np.float64))
    if smooth:
      down = down * torch.from_numpy(layer.smooth.astype(np.float64))
    lora = (down, _t(layer.up))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # its pad() indexes with a list of slices
    warnings.simplefilter("ignore", DeprecationWarning)
    out = dc_convert.convert_to_nunchaku_w4x4y16_linear_state_dict(
        weight, scale, bias=_t(layer.bias), smooth=smooth_t, lora=lora,
        shift=None if shift is None else torch.tensor([shift], dtype=torch.float64),
        float_point=layer.fmt == "nvfp4", subscale=subscale)
  return {key: _numpy(value) for key, value in out.items()}


def dc_pack_w4a16(codes: np.ndarray, scales: np.ndarray, bias: np.ndarray, *, zero: int | None,
                  splits: int) -> dict[str, np.ndarray]:
  """DeepCompressor's `convert_to_nunchaku_w4x16_linear_weight` (AWQ, zero point `zero`, 7 by
  default) for signed codes (N, K) and bf16 scales (G, N)."""
  n, k = codes.shape
  g = k // 64
  values = codes.astype(np.float64) * np.repeat(scales.astype(np.float64).T, 64, axis=1)
  scale = _t(scales.T.reshape(n, 1, g, 1))
  zero_t = None if zero is None else torch.full_like(scale, zero)
  weight, wscales, wzeros, bias_out = dc_utils.convert_to_nunchaku_w4x16_linear_weight(
      torch.from_numpy(values).to(torch.bfloat16), scale, zero=zero_t, bias=_t(bias),
      adanorm_splits=splits)
  return {"qweight": _numpy(weight), "wscales": _numpy(wscales), "wzeros": _numpy(wzeros),
          "bias": _numpy(bias_out)}


def reference_output(x: np.ndarray, layer: RandomLayer, bias: np.ndarray, shift: float
                     ) -> np.ndarray:
  """notes/nunchaku.md 3.5 in numpy:
  y = sum_g a_g w_g (q_x . q_w) wtscale wcscales + bias + x down^T up^T.

  Activations: xs = (x + shift) / smooth in float32, per token and group amax / Q (Q 15 shifted,
  7 signed INT4, 6 NVFP4 with the scale rounded to E4M3), codes round half to even.
  """
  group = layer.group
  xs = (x.astype(np.float32) + np.float32(shift)) / layer.smooth.astype(np.float32)
  m, k = xs.shape
  xg = xs.reshape(m, k // group, group)
  if layer.fmt == "int4":
    qmax = np.float32(15 if shift else 7)
    a = np.max(np.abs(xg), axis=-1, keepdims=True) / qmax
    safe = np.where(a > 0, a, np.float32(1))
    qx = np.where(a > 0, np.clip(np.rint(xg / safe), 0 if shift else -8, qmax), 0)
  else:
    a = np.minimum(np.max(np.abs(xg), axis=-1, keepdims=True) / np.float32(6), np.float32(448))
    a = a.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    safe = np.where(a > 0, a, np.float32(1))
    ratio = np.where(a > 0, np.clip(xg / safe, -6, 6), 0)
    qx = ratio.astype(ml_dtypes.float4_e2m1fn).astype(np.float64)  # round half to even
  wv = layer.codes.astype(np.float64) if layer.fmt == "int4" else E2M1[layer.codes]
  w_scales = layer.scales.astype(np.float64)
  y = np.zeros((m, layer.codes.shape[0]))
  for g in range(k // group):
    cols = slice(g * group, (g + 1) * group)
    psum = qx[:, g, :].astype(np.float64) @ wv[:, cols].T
    y += a[:, g].astype(np.float64) * w_scales[g][None, :] * psum
  y = y * layer.wtscale * layer.channel_scales() + bias.astype(np.float64)
  if layer.down.shape[0]:
    y += (x.astype(np.float64) @ layer.down.astype(np.float64).T) @ layer.up.astype(np.float64).T
  return y
