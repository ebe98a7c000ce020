"""A synthetic Nunchaku SDXL single file for a diffusers UNet2DConditionModel folder: each
transformer block's linears quantized (SVD low-rank branch plus round-to-nearest INT4 residual,
computed here in numpy) and packed by DeepCompressor's own packer, under the names and with the
metadata Nunchaku's SDXL files have (docs/format.md); every other tensor the folder's, in bf16.
Shared by the import tests of convert and cli."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.nunchaku_sdxl import SDXL_CLASS
from convert.safetensors_io import CheckpointReader, save_file
from tests.convert import _nunchaku_reference as ref
from tests.convert._nunchaku_file import QUANTIZATION

BF16 = np.dtype(ml_dtypes.bfloat16)
_BLOCK = re.compile(r"^(.*\.transformer_blocks\.\d+)\.attn1\.to_q\.weight$")
# Nunchaku's W4A4 linear of a block -> the diffusers linears it holds (in output order).
LAYERS = {"attn1.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
          "attn1.to_out.0": ("attn1.to_out.0",), "attn2.to_q": ("attn2.to_q",),
          "attn2.to_out.0": ("attn2.to_out.0",), "ff.net.0.proj": ("ff.net.0.proj",),
          "ff.net.2": ("ff.net.2",)}


def quantize(weight: np.ndarray, bias: np.ndarray | None, rng: np.random.Generator,
             rank: int) -> ref.RandomLayer:
  """An INT4 SVDQuant layer for a torch weight (N, K): a random smoothing factor, the rank-`rank`
  SVD of the smoothed weight as the branch (bf16), the rest rounded to INT4 per 64-group."""
  n, k = weight.shape
  smooth = rng.uniform(0.5, 2.0, (k,)).astype(BF16)
  lam = smooth.astype(np.float64)
  smoothed = weight.astype(np.float64) * lam
  u, s, vt = np.linalg.svd(smoothed, full_matrices=False)
  up = u[:, :rank].astype(BF16)
  down = (s[:rank, None] * vt[:rank] / lam).astype(BF16)
  residual = smoothed - up.astype(np.float64) @ (down.astype(np.float64) * lam)
  groups = residual.reshape(n, k // 64, 64)
  scales = np.maximum(np.abs(groups).max(axis=-1) / 7, 1e-8).T.astype(BF16)
  codes = np.clip(np.rint(groups / scales.astype(np.float64).T[..., None]), -8, 7)
  bias = np.zeros((n,)) if bias is None else bias
  return ref.RandomLayer(fmt="int4", codes=codes.reshape(n, k).astype(np.int8), scales=scales,
                         wtscale=1.0, bias=bias.astype(BF16), smooth=smooth, down=down, up=up)


def build_nunchaku_sdxl_file(file: Path, unet_folder: Path, rng: np.random.Generator, *,
                             rank: int = 32) -> dict[str, ref.RandomLayer]:
  """Writes the Nunchaku SDXL file of the diffusers UNet in `unet_folder`; returns each W4A4
  layer (its codes, scales and factors) by its Nunchaku name ("<block>.attn1.to_qkv")."""
  reader = CheckpointReader(unet_folder / "diffusion_pytorch_model.safetensors")
  weights = {key: np.asarray(reader.get(key)) for key in reader.keys()}
  blocks = sorted(m.group(1) for m in map(_BLOCK.match, weights) if m)
  tensors = {}
  layers = {}
  for block in blocks:
    for name, parts in LAYERS.items():
      weight = np.concatenate([weights.pop(f"{block}.{p}.weight") for p in parts])
      biases = [weights.pop(f"{block}.{p}.bias", None) for p in parts]
      bias = None if biases[0] is None else np.concatenate(biases)
      layer = quantize(weight, bias, rng, rank)
      packed = ref.dc_pack(layer)
      if bias is None:
        del packed["bias"]  # Nunchaku builds these linears without a bias
      tensors |= {f"{block}.{name}.{t}": v for t, v in packed.items()}
      layers[f"{block}.{name}"] = layer
  tensors |= {key: value.astype(BF16) for key, value in weights.items()}
  quant = {**QUANTIZATION["int4"], "rank": rank}
  config = json.loads((unet_folder / "config.json").read_text())
  save_file(tensors, file, metadata={"config": json.dumps(config), "comfy_config": "{}",
                                     "model_class": SDXL_CLASS,
                                     "quantization_config": json.dumps(quant)})
  return layers
