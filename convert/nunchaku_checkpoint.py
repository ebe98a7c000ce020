"""Whole Nunchaku checkpoints -> ours: `import_nunchaku(src, dst, *, base=None)`, FLUX.1 and SDXL.

SRC is a Nunchaku single-file checkpoint (`svdq-int4_r32-flux.1-dev.safetensors`,
`svdq-int4_r32-sdxl.safetensors` and the like: its safetensors metadata holds `config`,
`quantization_config` and `model_class`) or the older folder (`transformer_blocks.safetensors`,
`unquantized_layers.safetensors`, `config.json`). The model class (or, for a folder, the config's
`_class_name`) picks the model: FLUX.1 transformers here, SDXL UNets in `convert.nunchaku_sdxl`.

FLUX.1: keys under `transformer_blocks.` / `single_transformer_blocks.` are Nunchaku's quantized
blocks (notes/nunchaku.md 3.2, DeepCompressor's names); every other key is a diffusers
FluxTransformer2DModel weight. The layers map onto `models.flux.FluxTransformer` with
`split_proj_out` (see `DOUBLE`, `SINGLE`): a fused qkv becomes to_q / to_k / to_v (exact,
`svdq_jax.qlinear.split_outputs`), a single block's `out_proj` and `mlp_fc2` become `proj_out` and
`proj_out_mlp`, the W4A16 AdaLN linears are `convert.nunchaku.unpack_w4a16`. The whole bias of each
quantized linear is in its SVDQLinear; the layer's own bias is zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from convert import flux, mapping, registry, sdxl
from convert import nunchaku as nk
from convert.checkpoint import atomic_folder, check_against_model, write_into
from convert.loading import read_json_object
from convert.nunchaku_sdxl import SDXL_CLASS, read_nunchaku_sdxl
from convert.safetensors_io import CheckpointError, CheckpointReader
from models.flux import FluxConfig
from models.unet_sdxl import UNetSDXLConfig

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
# Nunchaku W4A4 layer -> (our linears, in output order; True for the INT4 shifted MLP input).
DOUBLE: dict[str, tuple[tuple[str, ...], bool]] = {
    "qkv_proj": (("attn/to_q", "attn/to_k", "attn/to_v"), False),
    "qkv_proj_context": (("attn/add_q_proj", "attn/add_k_proj", "attn/add_v_proj"), False),
    "out_proj": (("attn/to_out/0",), False),
    "out_proj_context": (("attn/to_add_out",), False),
    "mlp_fc1": (("ff/net/0/proj",), False),
    "mlp_fc2": (("ff/net/2",), True),
    "mlp_context_fc1": (("ff_context/net/0/proj",), False),
    "mlp_context_fc2": (("ff_context/net/2",), True),
}
SINGLE: dict[str, tuple[tuple[str, ...], bool]] = {
    "qkv_proj": (("attn/to_q", "attn/to_k", "attn/to_v"), False),
    "mlp_fc1": (("proj_mlp",), False),
    "out_proj": (("proj_out",), False),
    "mlp_fc2": (("proj_out_mlp",), True),
}
# W4A16 AdaLN linears -> (our linear, chunk count).
DOUBLE_ADANORM = {"norm1.linear": ("norm1/linear", 6),
                  "norm1_context.linear": ("norm1_context/linear", 6)}
SINGLE_ADANORM = {"norm.linear": ("norm/linear", 3)}
DOUBLE_NORMS = {"norm_q": "attn/norm_q", "norm_k": "attn/norm_k",
                "norm_added_q": "attn/norm_added_q", "norm_added_k": "attn/norm_added_k"}
SINGLE_NORMS = {"norm_q": "attn/norm_q", "norm_k": "attn/norm_k"}
PRECISIONS = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}
FLUX_CLASS = "NunchakuFluxTransformer2dModel"
# Our model type -> (the diffusers pipeline --base must be, the component folder DST replaces).
BASES = {"flux": ("FluxPipeline", "transformer"), "unet": ("StableDiffusionXLPipeline", "unet")}


@dataclasses.dataclass(frozen=True)
class NunchakuSource:
  """An opened Nunchaku checkpoint: its tensors, our model type ("flux" / "unet") and config
  (FluxConfig / UNetSDXLConfig), precision ("int4" / "nvfp4")."""

  reader: CheckpointReader
  config: FluxConfig | UNetSDXLConfig
  precision: str
  name: str
  model_type: str = "flux"


def _metadata_json(meta: Mapping[str, str], key: str, name: str) -> Any:
  try:
    return json.loads(meta[key])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{name}: safetensors metadata {key!r} is not valid JSON: {e}") from e


def _model_type(model_class: str, name: str) -> str:
  """"flux" or "unet" for a Nunchaku model class (a folder: its config's `_class_name`)."""
  lowered = model_class.lower()
  if "flux" in lowered:
    return "flux"
  if "sdxl" in lowered or model_class in sdxl.MODEL_TYPES:
    return "unet"
  raise CheckpointError(f"{name}: model_class {model_class!r} is not supported (Nunchaku FLUX.1 "
                        f"transformers and {SDXL_CLASS} are)")


def _precision_of(reader: CheckpointReader) -> str:
  """int4, or nvfp4 when any tensor is float8 (how Nunchaku's merge_safetensors decides)."""
  fp8 = any(reader.dtype(k) == nk.FP8 for k in reader.keys())
  return "nvfp4" if fp8 else "int4"


def open_nunchaku(src: str | os.PathLike) -> NunchakuSource:
  """Opens a Nunchaku FLUX.1 or SDXL checkpoint (single file or legacy folder) and checks its
  metadata and config.

  Raises:
    CheckpointError (one line) for a file that is not a Nunchaku checkpoint, an unsupported model
    class or config, or an unsupported precision, group size or rank.
  """
  path = Path(src)
  name = str(path)
  if path.is_dir():
    files = [path / "transformer_blocks.safetensors", path / "unquantized_layers.safetensors"]
    if not all(f.is_file() for f in files) or not (path / "config.json").is_file():
      raise CheckpointError(f"{name}: not a Nunchaku checkpoint folder (needs "
                            "transformer_blocks.safetensors, unquantized_layers.safetensors and "
                            "config.json)")
    reader = CheckpointReader(path)
    raw_config = read_json_object(path / "config.json")
    model_type = _model_type(str(raw_config.get("_class_name", "")), name)
    precision = _precision_of(reader)
    rank = None
  else:
    reader = CheckpointReader(path)
    meta = reader.metadata
    missing = [k for k in ("config", "quantization_config", "model_class") if k not in meta]
    if missing:
      raise CheckpointError(f"{name}: not a Nunchaku checkpoint (its safetensors metadata lacks "
                            f"{missing})")
    model_type = _model_type(meta["model_class"], name)
    raw_config = _metadata_json(meta, "config", name)
    quant = _metadata_json(meta, "quantization_config", name)
    weight = quant.get("weight", {}) if isinstance(quant, dict) else {}
    dtype = weight.get("dtype")
    if quant.get("method", "svdquant") != "svdquant" or dtype not in PRECISIONS:
      raise CheckpointError(f"{name}: quantization {quant.get('method')!r} with weight dtype "
                            f"{dtype!r} is not supported (svdquant int4 or fp4_e2m1_all)")
    precision = PRECISIONS[dtype]
    group = weight.get("group_size")
    if group != (nk.INT4_GROUP if precision == "int4" else nk.NVFP4_GROUP):
      raise CheckpointError(f"{name}: {dtype} with group size {group} is not supported")
    rank = quant.get("rank")
    if not isinstance(rank, int) or rank < 0 or rank % nk.LORA_TILE:
      raise CheckpointError(f"{name}: rank {rank!r} is not supported (a multiple of 16)")
  if not isinstance(raw_config, dict):
    raise CheckpointError(f"{name}: config is not a JSON object")
  try:
    if model_type == "unet":
      return NunchakuSource(reader, sdxl.config_from_json(raw_config), precision, name, "unet")
    config = flux.config_from_json(raw_config)
  except CheckpointError as e:
    raise CheckpointError(f"{name}: {e}") from e
  return NunchakuSource(reader, dataclasses.replace(config, split_proj_out=True), precision, name)


def w4a4_shape(lname: str, config: FluxConfig) -> tuple[int, int]:
  """(in, out) features of Nunchaku's W4A4 linear `lname` of a FLUX block, before Nunchaku pads
  both to multiples of 128."""
  dim, hidden = config.inner_dim, config.mlp_hidden_dim
  if lname.startswith("qkv_proj"):
    return dim, 3 * dim
  if lname.endswith("fc1"):
    return dim, hidden
  if lname.endswith("fc2"):
    return hidden, dim
  return dim, dim


def block_layers(config: FluxConfig) -> list[tuple[str, str, dict, dict, dict]]:
  """(Nunchaku prefix, our prefix, W4A4 map, AdaLN map, norm map) of every block."""
  blocks = [(f"transformer_blocks.{i}", f"transformer_blocks/{i}", DOUBLE, DOUBLE_ADANORM,
             DOUBLE_NORMS) for i in range(config.num_layers)]
  blocks += [(f"single_transformer_blocks.{i}", f"single_transformer_blocks/{i}", SINGLE,
              SINGLE_ADANORM, SINGLE_NORMS) for i in range(config.num_single_layers)]
  return blocks


def read_nunchaku(source: NunchakuSource, *, progress: bool = True) -> dict[str, Any]:
  """Our flat parameters from an opened Nunchaku checkpoint: FluxTransformer (`split_proj_out`)
  or UNetSDXL, with SVDQLinear kernels for the quantized linears (zero own biases), the rest as
  stored.

  Raises:
    CheckpointError naming the key for a missing, misshapen or unexpected tensor.
  """
  reader, config, name = source.reader, source.config, source.name
  if source.model_type == "unet":
    return read_nunchaku_sdxl(reader, config, name=name, progress=progress)
  table = {key: entry for key, entry in flux.key_table(config).items()
           if not key.startswith(BLOCK_PREFIXES)}
  missing = sorted(set(table) - set(reader.keys()))
  if missing:
    raise CheckpointError(f"{name}: not a Nunchaku FLUX checkpoint for its config: missing keys "
                          f"{mapping.key_listing(missing)}")
  arrays: dict[str, Any] = mapping.read_tensors(reader, table, name=name)
  keys_by_layer = nk.group_layer_keys(reader.keys(), lambda key: key.startswith(BLOCK_PREFIXES))
  used: set[str] = set(table)
  dim = config.inner_dim
  blocks = block_layers(config)
  for prefix, ours, w4a4, adanorm, norms in tqdm(blocks, desc="import", disable=not progress,
                                                 leave=False):
    for lname, (paths, shifted) in w4a4.items():
      layer_prefix = f"{prefix}.{lname}"
      tensors = nk.read_layer_tensors(reader, keys_by_layer, layer_prefix, name=name)
      shift = nk.GELU_SHIFT if shifted and source.precision == "int4" else 0.0
      k, n = w4a4_shape(lname, config)
      layer = nk.unpack_linear(tensors, act_shift=shift, in_features=k, out_features=n,
                               name=f"{name}: {layer_prefix}")
      arrays.update(nk.layer_arrays(layer, [f"{ours}/{path}" for path in paths],
                                    (dim,) * len(paths)))
      used.update(keys_by_layer[layer_prefix])
    for lname, (path, splits) in adanorm.items():
      layer_prefix = f"{prefix}.{lname}"
      tensors = nk.read_layer_tensors(reader, keys_by_layer, layer_prefix, name=name)
      layer = nk.unpack_w4a16(tensors, adanorm_splits=splits, name=f"{name}: {layer_prefix}")
      arrays.update(nk.layer_arrays(layer, [f"{ours}/{path}"], (layer.out_features,)))
      used.update(keys_by_layer[layer_prefix])
    for lname, path in norms.items():
      key = f"{prefix}.{lname}.weight"
      arrays[f"{ours}/{path}/scale"] = mapping.read_tensor(
          reader, key, mapping.KeyEntry(f"{ours}/{path}/scale", (config.attention_head_dim,)),
          name=name)
      used.add(key)
  unexpected = sorted(set(reader.keys()) - used)
  if unexpected:
    raise CheckpointError(f"{name}: unexpected keys {mapping.key_listing(unexpected)} (not a "
                          "Nunchaku FLUX checkpoint for its config)")
  check_against_model(arrays, registry.find_entry("flux"), config, source=name)
  return arrays


def _base_pipeline(base: str | os.PathLike) -> tuple[Path, str]:
  """The --base folder and the diffusers pipeline class its model_index.json names."""
  base = Path(base)
  index = base / "model_index.json"
  pipelines = " or ".join(p for p, _ in BASES.values())
  if not index.is_file():
    raise CheckpointError(f"{base}: no model_index.json (--base needs a diffusers {pipelines} "
                          "folder)")
  cls = read_json_object(index).get("_class_name")
  if cls not in [p for p, _ in BASES.values()]:
    raise CheckpointError(f"{base}: model_index.json names {cls!r}, --base needs a {pipelines}")
  return base, cls


def import_nunchaku(src: str | os.PathLike, dst: str | os.PathLike, *,
                    base: str | os.PathLike | None = None, overwrite: bool = False,
                    progress: bool = True) -> Path:
  """Writes a Nunchaku FLUX.1 or SDXL checkpoint as ours, exactly (no re-quantization).

  Args:
    src: the Nunchaku single file or legacy folder.
    dst: the folder to write: our transformer (UNet) checkpoint, or with `base` a whole pipeline
      folder (`svdq-jax sample DST` runs it) whose transformer (UNet) is the import and whose
      other components (text encoders, VAE, tokenizers, scheduler) are copied from `base`.
    base: a diffusers FluxPipeline folder for a FLUX.1 checkpoint, a StableDiffusionXLPipeline
      folder (SDXL or SDXL-Turbo) for an SDXL one, or None.
    overwrite: replace an existing `dst`.
    progress: a progress bar over the blocks.

  Returns:
    The written folder. Nothing is written on failure (everything goes to a temporary folder).

  Raises:
    CheckpointError (an InputError) with one line naming the file and what is wrong.
  """
  base_path, base_class = (None, None) if base is None else _base_pipeline(base)
  if Path(dst).exists() and not overwrite:
    raise CheckpointError(f"{dst}: already exists (remove it or pass overwrite=True)")
  source = open_nunchaku(src)
  pipeline, component = BASES[source.model_type]
  if base_path is not None and base_class != pipeline:
    raise CheckpointError(f"{base_path}: model_index.json names {base_class!r}, --base needs a "
                          f"{pipeline} for this checkpoint")
  arrays = read_nunchaku(source, progress=progress)
  with atomic_folder(dst, overwrite=overwrite) as folder:
    target = folder
    if base_path is not None:
      for entry in base_path.iterdir():
        if entry.name == component:
          continue
        copy = shutil.copytree if entry.is_dir() else shutil.copy2
        copy(entry, folder / entry.name)
      target = folder / component
      target.mkdir()
    write_into(target, arrays, model_type=source.model_type, config=source.config)
  return Path(dst)
