"""Bytes of the whole FLUX.1-dev transformer and SDXL UNet in bf16 and every preset (shapes only).

The model is built with `nnx.eval_shape` from its real config (`FluxConfig.dev()`: 19 double and 38
single blocks, 3072 wide), so nothing is allocated; `quantize_params` on the abstract state gives
abstract SVDQLinears whose array shapes are exactly those of docs/format.md. Layers the preset
skips (embedders, final norm and projection) stay bf16; the AdaLN modulation linears are INT4 g64
W4A16 under the 4-bit presets, as Nunchaku ships FLUX. The SDXL UNet (`UNetSDXLConfig.sdxl()`) is
built the same way; its 4-bit layers are the transformer blocks' attention and feed-forward
linears (not the cross-attention key/value on the text); convolutions, norms, embeddings,
time_emb_proj and proj_in/proj_out stay bf16, as Nunchaku ships SDXL.

Usage: python benchmarks/memory.py
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
from flax import nnx

from models.flux import FluxConfig, FluxTransformer
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig
from svdq_jax import QuantConfig, quantize_params, selected_kernels
from svdq_jax.config import DEFAULT_SKIP, DEFAULT_WEIGHT_ONLY
from svdq_jax.evaluation import ALL_PRESETS
from svdq_jax.metrics import model_bytes
from svdq_jax.params import matches_any
from svdq_jax.tree import named_leaves

PAPER_RATIO = 3.5  # SVDQuant paper, Fig. 8 caption: transformer memory, BF16 vs INT4


def _group(path: str) -> str:
  """Which part of the model a leaf belongs to, by the default patterns of svdq_jax.config."""
  if matches_any(path, DEFAULT_SKIP) or path.rsplit("/", 1)[-1] != "kernel":
    return "16-bit rest"
  return "AdaLN" if matches_any(path, DEFAULT_WEIGHT_ONLY) else "block linears"


def main() -> int:
  config = FluxConfig.dev()
  model = nnx.eval_shape(lambda: FluxTransformer(config, param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  parameters = sum(int(leaf.size) for _, leaf in named_leaves(state))
  bf16_bytes = model_bytes(state)
  print(f"# FLUX.1-dev transformer (models.flux.FluxConfig.dev(), nnx.eval_shape): "
        f"{parameters / 1e9:.2f} B parameters")
  print("# GB = 1e9 bytes; 'rest' = embedders, norms and the final projection (bf16).")
  print("# Shift-compensation biases (one float32 per output of each MLP down-projection,")
  print("# < 1 MB in all) are not in the abstract layers and not counted.")
  header = (f"{'preset':18s}{'total GB':>10s}{'vs bf16':>9s}{'block linears GB':>18s}"
            f"{'AdaLN GB':>10s}{'rest GB':>9s}")
  print(header)
  print("-" * len(header))
  totals = {}
  for preset in ALL_PRESETS:
    quantized = quantize_params(state, None, QuantConfig.preset(preset), progress=False)
    groups = {"block linears": 0, "AdaLN": 0, "16-bit rest": 0}
    for path, leaf in named_leaves(quantized):  # an SVDQLinear is one leaf here
      groups[_group(path)] += model_bytes(leaf)
    total = totals[preset] = model_bytes(quantized)
    assert total == sum(groups.values())
    print(f"{preset:18s}{total / 1e9:10.2f}{bf16_bytes / total:8.2f}x"
          f"{groups['block linears'] / 1e9:18.2f}{groups['AdaLN'] / 1e9:10.2f}"
          f"{groups['16-bit rest'] / 1e9:9.2f}")
  int4 = totals["svdquant-int4"]
  print(f"# svdquant-int4: {bf16_bytes / 1e9:.2f} GB -> {int4 / 1e9:.2f} GB, "
        f"{bf16_bytes / int4:.2f}x smaller (paper: {PAPER_RATIO}x, 22.7 GB -> 6.5 GB)")
  print()
  _unet_table()
  return 0


def _unet_table() -> None:
  """The SDXL UNet: total bytes per preset, split into the 4-bit block linears and the rest."""
  model = nnx.eval_shape(lambda: UNetSDXL(UNetSDXLConfig.sdxl(), param_dtype=jnp.bfloat16,
                                          rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  parameters = sum(int(leaf.size) for _, leaf in named_leaves(state))
  bf16_bytes = model_bytes(state)
  print(f"# SDXL UNet (models.unet_sdxl.UNetSDXLConfig.sdxl(), nnx.eval_shape): "
        f"{parameters / 1e9:.2f} B parameters")
  print("# 'rest' = convolutions, norms, time/add embeddings, time_emb_proj, proj_in/proj_out and")
  print("# the cross-attention key/value (bf16).")
  header = f"{'preset':18s}{'total GB':>10s}{'vs bf16':>9s}{'block linears GB':>18s}{'rest GB':>9s}"
  print(header)
  print("-" * len(header))
  for preset in ALL_PRESETS:
    config = QuantConfig.preset(preset)
    quantized = quantize_params(state, None, config, progress=False)
    selected = selected_kernels(state, config)
    linears = sum(model_bytes(leaf) for path, leaf in named_leaves(quantized) if path in selected)
    total = model_bytes(quantized)
    print(f"{preset:18s}{total / 1e9:10.2f}{bf16_bytes / total:8.2f}x{linears / 1e9:18.2f}"
          f"{(total - linears) / 1e9:9.2f}")


if __name__ == "__main__":
  sys.exit(main())
