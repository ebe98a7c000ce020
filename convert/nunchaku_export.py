"""Our quantized FLUX.1 checkpoints -> Nunchaku's single file: `export_nunchaku(src, dst)`.

The inverse of `convert.nunchaku_checkpoint.read_nunchaku`: the quantized blocks go out under
Nunchaku's (DeepCompressor's) names (`transformer_blocks.N.qkv_proj.qweight`, ...) packed by
`convert.nunchaku.pack_linear` / `pack_w4a16`, every other tensor as its diffusers key in
bfloat16, and the safetensors metadata holds `config` (diffusers' config.json), `model_class` and
`quantization_config`, as Nunchaku's own files do.

Nunchaku's layout is stricter than ours. A checkpoint exports only when it was quantized in it
(`svdq-jax quantize --nunchaku-layout`): single blocks' `proj_out` split (`FluxConfig.
split_proj_out`), q/k/v quantized as one layer (`QuantConfig.fused`: one smoothing factor and one
`lora_down`), every block linear W4A4 INT4 g64 or NVFP4 g16 (one precision, one rank after
padding to 16), the MLP down-projections shifted exactly when INT4, the AdaLN linears INT4 g64
W4A16 and everything else 16-bit; NVFP4 tensor and channel scales must be bfloat16 values.
Anything else is one CheckpointError line before a byte is written.

Values are rounded only where Nunchaku stores fewer bits: the float32 smoothing factors and biases
to bfloat16 (`pack_linear`; the AdaLN linears' scale chunks store bias + 1, `pack_w4a16`). The
file is written block by block (`save_file_streamed`): memory stays the loaded checkpoint plus one
block, and `dst` appears only once complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert import flux, registry
from convert import nunchaku as nk
from convert import nunchaku_checkpoint as nc
from convert.checkpoint import read_arrays
from convert.component import checkpoint_config, read_header
from convert.safetensors_io import CheckpointError, TensorSpec, save_file_streamed
from convert.state import load_into, path_str
from models.flux import FluxConfig, FluxTransformer
from svdq_jax import quantizers as qz
from svdq_jax.formats import QuantFormat
from svdq_jax.qlinear import SVDQLinear, is_quantized

LAYOUT_HINT = ("quantize with `svdq-jax quantize --nunchaku-layout` (svdquant-int4 or "
               "svdquant-nvfp4)")
QUANTIZATION = {
    "int4": {"method": "svdquant",
             "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
             "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}},
    "nvfp4": {"method": "svdquant",
              "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"],
                         "group_size": 16},
              "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan",
                             "group_size": 16}},
}


def _transformer_folder(src: str | os.PathLike) -> Path:
  """SRC itself, or its `transformer/` for a pipeline folder."""
  path = Path(src)
  if not path.exists():
    raise CheckpointError(f"{path}: does not exist")
  if (path / "model_index.json").is_file():
    return path / "transformer"
  return path


def _layout_error(name: str, what: str) -> CheckpointError:
  return CheckpointError(f"{name}: not in Nunchaku's layout: {what}; {LAYOUT_HINT}")


def _describe(fmt: QuantFormat) -> str:
  acts = fmt.act_format or "16-bit"
  shift = f", inputs shifted by {fmt.act_shift}" if fmt.act_shift else ""
  return f"{fmt.weight_format} g{fmt.group_size} weights / {acts} activations{shift}"


def _bf16_exact(values: np.ndarray) -> bool:
  values = np.asarray(values, np.float32)
  return np.array_equal(values.astype(nk.BF16).astype(np.float32), values)


class _Layer:
  """One Nunchaku linear of a block: its name, our layer (fused if needed) and own bias."""

  def __init__(self, key: str, layer: SVDQLinear, bias: np.ndarray, splits: int | None):
    self.key, self.layer, self.bias, self.splits = key, layer, bias, splits

  def specs(self) -> dict[str, TensorSpec]:
    if self.splits is None:
      return nk.linear_specs(self.layer, naming="deepcompressor")
    return nk.w4a16_specs(self.layer)

  def pack(self) -> dict[str, np.ndarray]:
    if self.splits is None:
      return nk.pack_linear(self.layer, bias=self.bias, naming="deepcompressor")
    return nk.pack_w4a16(self.layer, bias=self.bias, adanorm_splits=self.splits)


def _w4a4(arrays: dict[str, Any], name: str, key: str, paths: list[str], shifted: bool,
          precision: str) -> _Layer:
  """The W4A4 linear `key` from our kernels at `paths` (fused when there are several)."""
  layers, biases = [], []
  for path in paths:
    layer = arrays[f"{path}/kernel"]
    if not is_quantized(layer):
      raise _layout_error(name, f"{path} is 16-bit")
    fmt = layer.format
    want = nk.w4a4_format(precision, qz.GELU_SHIFT if shifted and precision == "int4" else 0.0)
    if fmt != want:
      raise _layout_error(name, f"{path} is {_describe(fmt)}, Nunchaku runs it as "
                          f"{_describe(want)}")
    layers.append(layer)
    biases.append(np.asarray(arrays[f"{path}/bias"], np.float32))
  if len(layers) == 1:
    layer = layers[0]
  else:
    try:
      layer = nk.concat_outputs(layers)
    except CheckpointError as e:
      raise _layout_error(name, f"{', '.join(paths)} are not one fused layer ({e})") from e
  if layer.weight_format == "nvfp4":
    scales = [layer.wtscale] + ([] if layer.wcscales is None else [layer.wcscales])
    if not all(_bf16_exact(s) for s in scales):
      raise CheckpointError(f"{name}: {key}'s NVFP4 tensor scale is not a bfloat16 value "
                            "(Nunchaku stores it in bfloat16; quantized before svdq-jax rounded "
                            "it, re-quantize)")
  return _Layer(key, layer, np.concatenate(biases), None)


def _w4a16(arrays: dict[str, Any], name: str, key: str, path: str, splits: int) -> _Layer:
  layer = arrays[f"{path}/kernel"]
  if not is_quantized(layer) or layer.format != nk.w4a16_format():
    found = _describe(layer.format) if is_quantized(layer) else "16-bit"
    raise _layout_error(name, f"{path} must be INT4 g64 weight-only (W4A16), Nunchaku's AdaLN "
                        f"layout, not {found}")
  return _Layer(key, layer, np.asarray(arrays[f"{path}/bias"], np.float32), splits)


def _block_units(arrays: dict[str, Any], config: FluxConfig, precision: str, name: str
                 ) -> list[tuple[str, list[_Layer], dict[str, np.ndarray]]]:
  """Per block: (its prefix, its linears, its 16-bit RMSNorm scales by key)."""
  blocks = []
  for prefix, ours, w4a4, adanorm, norms in nc.block_layers(config):
    layers = [_w4a4(arrays, name, f"{prefix}.{lname}", [f"{ours}/{p}" for p in paths],
                    shifted, precision) for lname, (paths, shifted) in w4a4.items()]
    layers += [_w4a16(arrays, name, f"{prefix}.{lname}", f"{ours}/{path}", splits)
               for lname, (path, splits) in adanorm.items()]
    scales = {f"{prefix}.{lname}.weight": np.asarray(arrays[f"{ours}/{path}/scale"])
              for lname, path in norms.items()}
    blocks.append((prefix, layers, scales))
  return blocks


def _precision(arrays: dict[str, Any], name: str) -> str:
  formats = {layer.weight_format for layer in arrays.values()
             if is_quantized(layer) and layer.format.quantizes_activations}
  if len(formats) != 1 or not formats <= set(QUANTIZATION):
    found = sorted(formats) or ["none"]
    raise _layout_error(name, f"its W4A4 layers are {'/'.join(found)}, Nunchaku needs all INT4 "
                        "or all NVFP4")
  return formats.pop()


def split_proj_out(model: FluxTransformer) -> FluxTransformer:
  """The same float transformer with `FluxConfig.split_proj_out`, before it is quantized in
  Nunchaku's layout: each single block's proj_out (D + 4D -> D) becomes proj_out (its first D
  input rows, the attention part, bias zero) and proj_out_mlp (the other 4D rows, with the bias),
  whose outputs are summed (the same function up to float rounding). An already split model is
  returned as it is.

  Raises:
    CheckpointError when a proj_out is already quantized (split it before quantizing).
  """
  config = model.config
  if config.split_proj_out:
    return model
  dim = config.inner_dim
  arrays = {path_str(path): variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for i in range(config.num_single_layers):
    prefix = f"single_transformer_blocks/{i}"
    kernel, bias = arrays.pop(f"{prefix}/proj_out/kernel"), arrays.pop(f"{prefix}/proj_out/bias")
    if is_quantized(kernel):
      raise CheckpointError(f"split_proj_out: {prefix}/proj_out is already quantized; split the "
                            "float model before quantizing it")
    arrays[f"{prefix}/proj_out/kernel"] = kernel[:dim]
    arrays[f"{prefix}/proj_out/bias"] = jnp.zeros_like(bias)
    arrays[f"{prefix}/proj_out_mlp/kernel"] = kernel[dim:]
    arrays[f"{prefix}/proj_out_mlp/bias"] = bias
  split = registry.find_entry("flux").abstract_model(
      dataclasses.replace(config, split_proj_out=True), dtype=model.dtype)
  return load_into(split, arrays, source="split_proj_out", keep_stored_dtype=True, consume=True)


def export_nunchaku(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                    progress: bool = True) -> Path:
  """Writes our quantized FLUX.1 transformer as a Nunchaku single-file checkpoint.

  Args:
    src: our checkpoint folder of a FluxTransformer, or a pipeline folder whose `transformer/` is
      one (what `svdq-jax quantize --nunchaku-layout` writes).
    dst: the `.safetensors` file to write.
    overwrite: replace an existing `dst`.
    progress: a progress bar over the blocks.

  Returns:
    The written file. Nothing is written on failure.

  Raises:
    CheckpointError (an InputError) with one line naming the file, the layer and what is wrong.
  """
  dst = Path(dst)
  if dst.suffix != ".safetensors":
    raise CheckpointError(f"{dst}: the output must be a .safetensors file")
  if dst.exists() and not overwrite:
    raise CheckpointError(f"{dst}: already exists (remove it or pass overwrite=True)")
  folder = _transformer_folder(src)
  name = str(folder)
  header = read_header(folder)
  component = checkpoint_config(folder, header)
  if component.entry.name != "flux":
    raise CheckpointError(f"{name}: a {component.entry.name} checkpoint; Nunchaku export "
                          "supports FLUX.1 transformers")
  config = component.config
  if not config.split_proj_out:
    raise _layout_error(name, "its single blocks have one proj_out (FluxConfig.split_proj_out "
                        "is off)")
  json_config = flux.config_to_json(config)
  arrays = read_arrays(folder, header)
  precision = _precision(arrays, name)
  table = {key: entry for key, entry in flux.key_table(config).items()
           if not key.startswith(nc.BLOCK_PREFIXES)}
  for key, entry in table.items():
    if is_quantized(arrays[entry.ours]):
      raise _layout_error(name, f"{entry.ours} is quantized, Nunchaku keeps {key} 16-bit")
  blocks = _block_units(arrays, config, precision, name)
  ranks = {-(-layer.layer.rank // nk.LORA_TILE) * nk.LORA_TILE for _, layers, _ in blocks
           for layer in layers if layer.splits is None}
  if len(ranks) != 1:
    raise CheckpointError(f"{name}: its W4A4 layers have ranks {sorted(ranks)} (padded to 16); "
                          "Nunchaku's metadata holds one rank")

  specs: dict[str, TensorSpec] = {}
  for key, entry in table.items():
    specs[key] = TensorSpec(nk.BF16, tuple(entry.shape))
  for _, layers, scales in blocks:
    for layer in layers:
      specs |= {f"{layer.key}.{t}": spec for t, spec in layer.specs().items()}
    specs |= {key: TensorSpec(nk.BF16, value.shape) for key, value in scales.items()}

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for key, entry in table.items():
      value = np.asarray(arrays[entry.ours]).astype(nk.BF16)
      yield key, value.T if entry.transpose else value
    for _, layers, scales in tqdm(blocks, desc="export", disable=not progress, leave=False):
      for layer in layers:
        packed = layer.pack()
        for t in layer.specs():
          yield f"{layer.key}.{t}", packed[t]
      for key, value in scales.items():
        yield key, value.astype(nk.BF16)

  quantization = {**QUANTIZATION[precision], "rank": ranks.pop()}
  metadata = {"config": json.dumps(json_config), "model_class": nc.FLUX_CLASS,
              "quantization_config": json.dumps(quantization)}
  save_file_streamed(specs, tensors(), dst, metadata)
  return dst
