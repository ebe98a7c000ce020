"""Checkpoints whose layer headers hold the whole QuantConfig (layer metadata version 1) still load.

tests/data/v1_checkpoint was written by the code of that format (tests/data/make_v1_checkpoint.py).
Each layer's format is checked against its stored header, and its product against a float64 numpy
recomputation from the stored arrays that follows docs/format.md (not against our own output).
"""

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from convert.checkpoint import read_arrays
from svdq_jax import QuantFormat, is_quantized, svdq_dot

CHECKPOINT = Path(__file__).parents[1] / "data" / "v1_checkpoint"
GELU_SHIFT = 0.171875
# The layers make_v1_checkpoint.py wrote: (weight format, activation format, group, act_shift).
FORMATS = {
    "proj_in/kernel": ("int4", "int4", 64, 0.0),
    "blocks/0/kernel": ("int4", "int4", 64, GELU_SHIFT),
    "blocks/1/kernel": ("nvfp4", "nvfp4", 16, 0.0),
    "blocks/2/kernel": ("nf4", None, 64, 0.0),
    "proj_out/kernel": ("int8", "int8", 128, 0.0),
}
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float64)  # the OCP MX spec's E2M1 magnitudes
# The NF4 code book as published with QLoRA (bitsandbytes' table).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


@pytest.fixture(scope="module")
def layers():
  return {path: value for path, value in read_arrays(CHECKPOINT).items() if is_quantized(value)}


def test_v1_headers_hold_the_whole_config():
  header = json.loads((CHECKPOINT / "config.json").read_text())["svdq_jax"]
  assert sorted(header["quantized"]) == sorted(FORMATS)
  for metadata in header["quantized"].values():
    assert metadata["format_version"] == 1 and "skip" in metadata["config"]


def test_layers_load_with_their_formats(layers):
  header = json.loads((CHECKPOINT / "config.json").read_text())["svdq_jax"]["quantized"]
  assert sorted(layers) == sorted(FORMATS)
  for path, (weight, act, group, shift) in FORMATS.items():
    layer = layers[path]
    assert layer.format == QuantFormat(weight, act, group, shift), path
    assert layer.act_shift == header[path]["act_shift"]
    assert layer.rank == header[path]["rank"] and layer.shape == (
        header[path]["in_features"], header[path]["out_features"])
    assert layer.metadata()["format_version"] == 2  # written again in today's format


def _unpack(packed: np.ndarray, signed: bool) -> np.ndarray:
  """(N, K // 2) uint8 -> (N, K) codes; element k in byte k // 2, low nibble for even k."""
  nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
  nibbles = nibbles.astype(np.int64)
  return np.where(nibbles >= 8, nibbles - 16, nibbles) if signed else nibbles


def _e2m1(pattern: np.ndarray) -> np.ndarray:
  return np.where(pattern & 8, -1.0, 1.0) * E2M1[pattern & 7]


def _weight_values(arrays: dict, weight: str) -> np.ndarray:
  """(N, K) float64 code values, before scales."""
  qweight = np.asarray(arrays["qweight"])
  if weight == "int8":
    return qweight.astype(np.float64)
  codes = _unpack(qweight, signed=weight == "int4")
  if weight == "nvfp4":
    return _e2m1(codes)
  if weight == "nf4":
    return NF4[codes].astype(np.float64)
  return codes.astype(np.float64)


def _quantized_activations(xs: np.ndarray, act: str, group: int, shifted: bool) -> np.ndarray:
  """Per token and group, float32 as docs/format.md: the dequantized activations (M, K) float64."""
  m, k = xs.shape
  xg = xs.reshape(m, k // group, group)
  amax = np.abs(xg).max(-1, keepdims=True)
  if act == "nvfp4":
    scale = np.minimum(amax / np.float32(6), np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
    scale = scale.astype(np.float32)
    ratio = np.where(scale > 0, xg / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(ratio, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
  else:
    qmax = {"int4": 15 if shifted else 7, "int8": 127}[act]
    qmin = 0 if shifted else -qmax - 1
    scale = (amax / np.float32(qmax)).astype(np.float32)
    ratio = np.where(scale > 0, xg / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint(ratio), qmin, qmax)
  return (q * scale.astype(np.float64)).reshape(m, k)


def _expected(layer, x: np.ndarray, fmt: tuple) -> np.ndarray:
  """The layer's product from its stored arrays, in float64 (float32 where the format rounds)."""
  arrays = {name: np.asarray(value) for name, value in layer.arrays().items()}
  weight, act, group, shift = fmt
  k, n = layer.shape
  wscales = arrays["wscales"].astype(np.float64)  # (K // group, N)
  residual = (_weight_values(arrays, weight).T.reshape(k // group, group, n)
              * wscales[:, None, :]).reshape(k, n) * float(arrays["wtscale"])
  smooth = arrays["smooth"].astype(np.float64)
  low_rank = arrays["lora_down"].astype(np.float64) @ arrays["lora_up"].astype(np.float64)
  if act is None:
    y = x.astype(np.float64) @ (residual / smooth[:, None] + low_rank)
  else:
    xs = ((x.astype(np.float32) + np.float32(shift)) / arrays["smooth"]).astype(np.float32)
    y = _quantized_activations(xs, act, group, shift != 0) @ residual
    y = y + x.astype(np.float64) @ low_rank
  if "bias" in arrays:
    y = y + arrays["bias"].astype(np.float64)
  return y


@pytest.mark.parametrize("path", sorted(FORMATS))
def test_products_match_numpy_from_the_stored_arrays(layers, path):
  layer = layers[path]
  rng = np.random.default_rng(3)
  x = rng.standard_normal((8, layer.in_features)).astype(np.float32)
  if FORMATS[path][3]:
    x = (0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))).astype(np.float32)  # GELU
  expected = _expected(layer, x, FORMATS[path])
  got = np.asarray(svdq_dot(x, layer, impl="xla"), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert np.abs(expected).max() > 0.1  # a product, not zeros
