"""diffusers `AutoencoderKL` checkpoints -> `models.vae.AutoencoderKL`.

The mapping is by name (see `convert.mapping.convert_by_name`): our paths spell the diffusers
keys. Checkpoints saved before diffusers renamed the mid-block attention
(`attentions.0.query/key/value/proj_attn`) are read too, as diffusers itself does on load.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from convert.mapping import KeyEntry, convert_by_name, name_table
from convert.safetensors_io import CheckpointError, CheckpointReader
from convert.state import state_paths
from models.vae import AutoencoderKL, VAEConfig

MODEL_TYPES: tuple[str, ...] = ("AutoencoderKL",)

# Config keys that do not change the model's encode/decode.
_IGNORED_KEYS = frozenset({
    "sample_size",  # only the tile size of diffusers' tiled decoding
    "force_upcast",  # a pipeline hint to run the VAE in float32
})
_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
           "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor",
           "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "latents_mean",
           "latents_std")
# diffusers' AutoencoderKL defaults, used where a config.json leaves a key out.
_DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,),
                           layers_per_block=1, latent_channels=4, norm_num_groups=32,
                           scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
                           use_post_quant_conv=True, mid_block_add_attention=True,
                           latents_mean=None, latents_std=None)
_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def config_from_json(cfg: dict) -> VAEConfig:
  """Maps a diffusers `AutoencoderKL` config.json to a `VAEConfig`.

  Block types other than DownEncoderBlock2D / UpDecoderBlock2D, activations other than SiLU, and
  unknown keys are a CheckpointError.
  """
  class_name = cfg.get("_class_name", "AutoencoderKL")
  if class_name not in MODEL_TYPES:
    raise CheckpointError(f"convert.vae: config is for {class_name!r}, not one of {MODEL_TYPES}")
  known = set(_FIELDS) | _IGNORED_KEYS | {"down_block_types", "up_block_types", "act_fn"}
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
  if unknown:
    raise CheckpointError(f"convert.vae: unsupported config keys {unknown}")
  if cfg.get("act_fn", "silu") not in ("silu", "swish"):
    raise CheckpointError(f"convert.vae: act_fn={cfg['act_fn']!r} is not supported (only 'silu')")
  values = {f: cfg.get(f, _DIFFUSERS_DEFAULTS[f]) for f in _FIELDS}
  n_blocks = len(values["block_out_channels"])
  for key, block in (("down_block_types", "DownEncoderBlock2D"),
                     ("up_block_types", "UpDecoderBlock2D")):
    types = list(cfg.get(key, [block]))
    if types != [block] * n_blocks:
      raise CheckpointError(f"convert.vae: {key}={types} is not supported (needs {n_blocks} x "
                            f"{block!r}, one per block_out_channels entry)")
  for key in ("block_out_channels", "latents_mean", "latents_std"):
    if values[key] is not None:
      values[key] = tuple(values[key])
  try:
    return VAEConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"convert.vae: invalid config: {e}") from e


def _current_name(key: str) -> str:
  """Legacy mid-block attention names -> current ones ("...attentions.0.query.weight" -> to_q)."""
  m = _LEGACY_ATTENTION.match(key)
  return f"{m[1]}{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key


def _paths(config: VAEConfig) -> dict:
  """Our flat `{path: ShapeDtypeStruct}` for `config` (built under `nnx.eval_shape`)."""
  return state_paths(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))))


def convert_state(reader: CheckpointReader, config: VAEConfig) -> dict[str, np.ndarray]:
  """A diffusers AutoencoderKL checkpoint -> flat `{our path: array}` (conv OIHW -> HWIO)."""
  return convert_by_name(reader, _paths(config), name=str(reader.path), rename=_current_name)


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def export_table(config: VAEConfig) -> dict[str, KeyEntry]:
  """The key table `convert.export` writes by: current diffusers names (`to_q`, `to_out.0`)."""
  return name_table(_paths(config))


def config_to_json(config: VAEConfig) -> dict:
  """The diffusers `AutoencoderKL` config.json of `config` (inverse of `config_from_json`)."""
  values = config.to_dict()
  n_blocks = len(config.block_out_channels)
  return {"_class_name": MODEL_TYPES[0], **{k: values[k] for k in _FIELDS},
          "down_block_types": ["DownEncoderBlock2D"] * n_blocks,
          "up_block_types": ["UpDecoderBlock2D"] * n_blocks, "act_fn": "silu"}
