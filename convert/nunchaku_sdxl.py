"""Nunchaku SDXL / SDXL-Turbo UNet checkpoints -> `models.unet_sdxl.UNetSDXL` parameters, exactly.

Nunchaku quantizes only the linears of the UNet's transformer blocks (docs/format.md, "Nunchaku
SDXL files"): per block `attn1.to_qkv` (q, k and v fused along the output, no bias),
`attn1.to_out.0`, `attn2.to_q` (no bias), `attn2.to_out.0`, `ff.net.0.proj` (GEGLU's projection,
value half then gate half, diffusers' order) and `ff.net.2`, all W4A4 on signed activations. Every
other key, `attn2.to_k` / `attn2.to_v` included, is a 16-bit diffusers `UNet2DConditionModel`
weight under its diffusers name. The fused q/k/v becomes our `to_q`, `to_k`, `to_v`
(`svdq_jax.qlinear.split_outputs`, exact); the whole bias of each quantized linear is in its
SVDQLinear and the layer's own bias is zero.
"""

from __future__ import annotations

import re
from typing import Any

from flax import nnx
from tqdm.auto import tqdm

from convert import mapping, registry
from convert import nunchaku as nk
from convert.checkpoint import check_against_model
from convert.safetensors_io import CheckpointError, CheckpointReader
from convert.state import state_paths
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig

# Nunchaku W4A4 linear of a transformer block -> (our linears in output order, has a bias).
BLOCK_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "attn1.to_qkv": (("attn1/to_q", "attn1/to_k", "attn1/to_v"), False),
    "attn1.to_out.0": (("attn1/to_out/0",), True),
    "attn2.to_q": (("attn2/to_q",), False),
    "attn2.to_out.0": (("attn2/to_out/0",), True),
    "ff.net.0.proj": (("ff/net/0/proj",), True),
    "ff.net.2": (("ff/net/2",), True),
}
SDXL_CLASS = "NunchakuSDXLUNet2DConditionModel"
_BLOCK = re.compile(r"^(.*\.transformer_blocks\.\d+)\.attn1\.to_q\.weight$")


def _quantized_torch_keys(prefix: str) -> set[str]:
  """The diffusers keys (weights and biases) of the block's linears that Nunchaku quantizes."""
  keys = set()
  for paths, _ in BLOCK_LAYERS.values():
    for path in paths:
      base = f"{prefix}.{path.replace('/', '.')}"
      keys |= {f"{base}.weight", f"{base}.bias"}
  return keys


def read_nunchaku_sdxl(reader: CheckpointReader, config: UNetSDXLConfig, *, name: str,
                       progress: bool = True) -> dict[str, Any]:
  """Our flat UNetSDXL parameters from a Nunchaku SDXL checkpoint: SVDQLinear kernels for the
  quantized linears (zero own biases), the 16-bit tensors as stored (transposed to our layout).

  Raises:
    CheckpointError naming the key for a missing, misshapen or unexpected tensor.
  """
  model = nnx.eval_shape(lambda: UNetSDXL(config, rngs=nnx.Rngs(0)))
  full = mapping.name_table(state_paths(model))
  blocks = sorted(m.group(1) for m in map(_BLOCK.match, full) if m)
  quantized = set().union(*(_quantized_torch_keys(b) for b in blocks)) if blocks else set()
  table = {key: entry for key, entry in full.items() if key not in quantized}
  missing = sorted(set(table) - set(reader.keys()))
  if missing:
    raise CheckpointError(f"{name}: not a Nunchaku SDXL checkpoint for its config: missing keys "
                          f"{mapping.key_listing(missing)}")
  arrays: dict[str, Any] = mapping.read_tensors(reader, table, name=name)
  keys_by_layer = nk.group_layer_keys(reader.keys(), lambda key: ".transformer_blocks." in key)
  used: set[str] = set(table)
  for prefix in tqdm(blocks, desc="import", disable=not progress, leave=False):
    ours = prefix.replace(".", "/")
    for lname, (paths, has_bias) in BLOCK_LAYERS.items():
      layer_prefix = f"{prefix}.{lname}"
      tensors = nk.read_layer_tensors(reader, keys_by_layer, layer_prefix, name=name)
      shapes = [full[f"{prefix}.{p.replace('/', '.')}.weight"].shape for p in paths]
      widths = [s[0] for s in shapes]
      layer = nk.unpack_linear(tensors, in_features=shapes[0][1], out_features=sum(widths),
                               has_bias=has_bias, name=f"{name}: {layer_prefix}")
      arrays.update(nk.layer_arrays(layer, [f"{ours}/{path}" for path in paths], widths,
                                    bias=has_bias))
      used.update(keys_by_layer[layer_prefix])
  unexpected = sorted(set(reader.keys()) - used)
  if unexpected:
    raise CheckpointError(f"{name}: unexpected keys {mapping.key_listing(unexpected)} (not a "
                          "Nunchaku SDXL checkpoint for its config)")
  check_against_model(arrays, registry.find_entry("unet"), config, source=name)
  return arrays
