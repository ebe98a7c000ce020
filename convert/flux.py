"""diffusers `FluxTransformer2DModel` checkpoints -> `models.flux.FluxTransformer` parameters.

Our parameter paths are the diffusers keys with "." replaced by "/", `weight` renamed to `kernel`
for linear layers (transposed from torch's (out, in) to (in, out)) and to `scale` for the RMS q/k
norms. The key table below lists every tensor a diffusers checkpoint holds, with its shape, so that
a checkpoint that does not fit the config fails with the key named before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert import mapping
from convert.mapping import KeyEntry, TensorSource
from convert.safetensors_io import CheckpointError, CheckpointReader
from models.flux import FluxConfig

MODEL_TYPES: tuple[str, ...] = ("FluxTransformer2DModel",)

# diffusers config.json fields we read; everything else not starting with "_" is rejected.
CONFIG_FIELDS: tuple[str, ...] = (
    "patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
    "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
    "guidance_embeds", "axes_dims_rope")


def _linear(name: str, in_features: int, out_features: int) -> dict[str, KeyEntry]:
  ours = name.replace(".", "/")
  return {f"{name}.weight": KeyEntry(f"{ours}/kernel", (out_features, in_features), True),
          f"{name}.bias": KeyEntry(f"{ours}/bias", (out_features,))}


def _rms_norm(name: str, dim: int) -> dict[str, KeyEntry]:
  return {f"{name}.weight": KeyEntry(f"{name.replace('.', '/')}/scale", (dim,))}


def _prefixed(prefix: str, entries: dict[str, KeyEntry]) -> dict[str, KeyEntry]:
  if not prefix:
    return entries
  ours = prefix.replace(".", "/")
  return {f"{prefix}.{key}": dataclasses.replace(e, ours=f"{ours}/{e.ours}")
          for key, e in entries.items()}


def _attention_keys(config: FluxConfig, *, joint: bool) -> dict[str, KeyEntry]:
  dim, head_dim = config.inner_dim, config.attention_head_dim
  keys = {**_rms_norm("attn.norm_q", head_dim), **_rms_norm("attn.norm_k", head_dim)}
  for name in ("to_q", "to_k", "to_v"):
    keys |= _linear(f"attn.{name}", dim, dim)
  if joint:
    keys |= _linear("attn.to_out.0", dim, dim)
    keys |= _rms_norm("attn.norm_added_q", head_dim) | _rms_norm("attn.norm_added_k", head_dim)
    for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
      keys |= _linear(f"attn.{name}", dim, dim)
  return keys


def double_block_keys(config: FluxConfig, prefix: str = "") -> dict[str, KeyEntry]:
  """Key table of one double-stream block (`transformer_blocks.N` is the prefix in a model)."""
  dim, hidden = config.inner_dim, config.mlp_hidden_dim
  keys = _linear("norm1.linear", dim, 6 * dim) | _linear("norm1_context.linear", dim, 6 * dim)
  keys |= _attention_keys(config, joint=True)
  for ff in ("ff", "ff_context"):
    keys |= _linear(f"{ff}.net.0.proj", dim, hidden) | _linear(f"{ff}.net.2", hidden, dim)
  return _prefixed(prefix, keys)


def single_block_keys(config: FluxConfig, prefix: str = "") -> dict[str, KeyEntry]:
  """Key table of one single-stream block (`single_transformer_blocks.N` in a model)."""
  dim, hidden = config.inner_dim, config.mlp_hidden_dim
  keys = _linear("norm.linear", dim, 3 * dim) | _linear("proj_mlp", dim, hidden)
  keys |= _linear("proj_out", dim + hidden, dim)
  keys |= _attention_keys(config, joint=False)
  return _prefixed(prefix, keys)


def key_table(config: FluxConfig) -> dict[str, KeyEntry]:
  """Every tensor of a diffusers FluxTransformer2DModel checkpoint for `config`."""
  dim = config.inner_dim
  embedders = ["timestep_embedder"] + (["guidance_embedder"] if config.guidance_embeds else [])
  keys: dict[str, KeyEntry] = {}
  for name in embedders:
    keys |= _linear(f"time_text_embed.{name}.linear_1", 256, dim)
    keys |= _linear(f"time_text_embed.{name}.linear_2", dim, dim)
  keys |= _linear("time_text_embed.text_embedder.linear_1", config.pooled_projection_dim, dim)
  keys |= _linear("time_text_embed.text_embedder.linear_2", dim, dim)
  keys |= _linear("context_embedder", config.joint_attention_dim, dim)
  keys |= _linear("x_embedder", config.in_channels, dim)
  for i in range(config.num_layers):
    keys |= double_block_keys(config, f"transformer_blocks.{i}")
  for i in range(config.num_single_layers):
    keys |= single_block_keys(config, f"single_transformer_blocks.{i}")
  keys |= _linear("norm_out.linear", dim, 2 * dim)
  keys |= _linear("proj_out", dim, config.proj_out_dim)
  return keys


def convert_tensors(source: TensorSource, table: Mapping[str, KeyEntry], *,
                    name: str) -> dict[str, np.ndarray]:
  """`convert.mapping.convert_tensors` with FLUX's mismatch message (see there).

  Linear kernels are transposed views of the memory-mapped tensors: nothing is copied until the
  caller materializes them.
  """
  return mapping.convert_tensors(
      source, table, name=name, what="not a FluxTransformer2DModel checkpoint for this config")


def convert_state(reader: CheckpointReader, config: FluxConfig) -> dict[str, np.ndarray]:
  """The flat parameters of `FluxTransformer(config)` from a diffusers checkpoint."""
  return convert_tensors(reader, key_table(config), name=str(reader.path))


def config_from_json(cfg: dict[str, Any]) -> FluxConfig:
  """Our `FluxConfig` from a diffusers FluxTransformer2DModel config.json.

  Keys starting with "_" (class name, diffusers version, ...) are metadata; any other key we do
  not know is a CheckpointError, as is a `_class_name` other than FluxTransformer2DModel.
  """
  class_name = cfg.get("_class_name", MODEL_TYPES[0])
  if class_name not in MODEL_TYPES:
    raise CheckpointError(f"config.json: _class_name {class_name!r} is not a FLUX transformer "
                          f"(expected one of {MODEL_TYPES})")
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in CONFIG_FIELDS)
  if unknown:
    raise CheckpointError(f"config.json: unsupported FluxTransformer2DModel fields {unknown} "
                          f"(known: {sorted(CONFIG_FIELDS)})")
  values = {k: cfg[k] for k in CONFIG_FIELDS if k in cfg}
  if "axes_dims_rope" in values:
    values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
  try:
    return FluxConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"config.json: invalid FluxTransformer2DModel config: {e}") from e


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def export_table(config: FluxConfig) -> dict[str, KeyEntry]:
  """The key table `convert.export` writes a checkpoint by (the one `convert_state` reads)."""
  return key_table(config)


def config_to_json(config: FluxConfig) -> dict[str, Any]:
  """The diffusers FluxTransformer2DModel config.json of `config` (inverse of `config_from_json`).

  Raises:
    CheckpointError when `config` sets a field diffusers' config cannot hold (rope_theta,
    mlp_ratio other than FLUX.1's 10000 and 4).
  """
  fixed = FluxConfig()
  for name in ("rope_theta", "mlp_ratio"):
    if getattr(config, name) != getattr(fixed, name):
      raise CheckpointError(f"FluxConfig.{name}={getattr(config, name)} has no diffusers "
                            f"FluxTransformer2DModel field (it is fixed at {getattr(fixed, name)})")
  values = config.to_dict()
  return {"_class_name": MODEL_TYPES[0], **{k: values[k] for k in CONFIG_FIELDS}}
