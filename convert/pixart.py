"""diffusers `PixArtTransformer2DModel` checkpoints -> `models.pixart.PixArtSigmaTransformer`.

Our parameter paths spell the diffusers keys ("transformer_blocks/0/attn1/to_q/kernel" is
"transformer_blocks.0.attn1.to_q.weight"), so the mapping is by name: `convert_by_name` walks the
model's (allocation-free) parameter tree and reads the matching tensor for each parameter,
transposing Linear (out, in) -> (in, out) and Conv2d OIHW -> HWIO (`convert.mapping`, shared with
the VAE converter).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from convert.mapping import convert_by_name
from convert.safetensors_io import CheckpointError, CheckpointReader
from convert.state import state_paths
from models.pixart import PixArtConfig, PixArtSigmaTransformer

# Checkpoints converted before diffusers 0.28 (the PixArt-Sigma releases among them) name the
# class "Transformer2DModel"; diffusers remaps it to PixArtTransformer2DModel when
# norm_type == "ada_norm_single", which `config_from_json` requires.
MODEL_TYPES: tuple[str, ...] = ("PixArtTransformer2DModel", "Transformer2DModel")

# Config keys that do not change the inference forward of the converted model.
_IGNORED_KEYS = frozenset({
    "dropout",  # inference only
    "upcast_attention",  # softmax precision; ours always normalises in float32
    "norm_num_groups",  # unused by the ada_norm_single path
    "num_embeds_ada_norm",  # only required to be set; unused by adaLN-single
    "use_linear_projection",  # deprecated in diffusers, unused
})
# Config keys whose value must be the one given (other values select code paths we do not have).
_REQUIRED_VALUES: dict[str, Any] = {
    "norm_type": "ada_norm_single",
    "activation_fn": "gelu-approximate",
    "attention_type": "default",
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "double_self_attention": False,
}
_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
           "num_layers", "cross_attention_dim", "caption_channels", "sample_size", "patch_size",
           "attention_bias", "norm_elementwise_affine", "norm_eps")


def config_from_json(cfg: dict) -> PixArtConfig:
  """Maps a diffusers `PixArtTransformer2DModel` config.json to a `PixArtConfig`.

  Follows diffusers' defaults (`interpolation_scale=None` -> max(sample_size // 64, 1);
  `use_additional_conditions=None` -> True at sample_size 128). Size conditioning (PixArt-Alpha
  1024), other norm/activation/attention types and unknown keys are a CheckpointError.
  """
  class_name = cfg.get("_class_name", "PixArtTransformer2DModel")
  if class_name not in MODEL_TYPES:
    raise CheckpointError(f"convert.pixart: config is for {class_name!r}, not one of {MODEL_TYPES}")
  if class_name == "Transformer2DModel" and cfg.get("norm_type") != "ada_norm_single":
    raise CheckpointError(f"convert.pixart: a Transformer2DModel with norm_type "
                          f"{cfg.get('norm_type')!r} is not PixArt (needs 'ada_norm_single')")
  defaults = {f: getattr(PixArtConfig(), f) for f in _FIELDS}
  # diffusers' own defaults where they differ from PixArt-Sigma-1024's.
  defaults["caption_channels"] = None
  known = set(_FIELDS) | _IGNORED_KEYS | set(_REQUIRED_VALUES) | {
      "interpolation_scale", "use_additional_conditions"}
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
  if unknown:
    raise CheckpointError(f"convert.pixart: unsupported config keys {unknown}")
  for key, value in _REQUIRED_VALUES.items():
    if key in cfg and cfg[key] != value:
      raise CheckpointError(f"convert.pixart: config {key}={cfg[key]!r} is not supported "
                            f"(only {value!r})")
  values = {f: cfg.get(f, defaults[f]) for f in _FIELDS}
  if values["out_channels"] is None:
    values["out_channels"] = values["in_channels"]
  sample_size = values["sample_size"]
  additional = cfg.get("use_additional_conditions")
  if additional is None:
    additional = sample_size == 128
  if additional:
    raise CheckpointError(
        "convert.pixart: use_additional_conditions (resolution / aspect-ratio embeddings, "
        "PixArt-Alpha 1024) is not supported; PixArt-Sigma configs set it to false")
  scale = cfg.get("interpolation_scale")
  values["interpolation_scale"] = float(scale if scale is not None else max(sample_size // 64, 1))
  if values["cross_attention_dim"] is None:
    raise CheckpointError("convert.pixart: cross_attention_dim=None (no cross-attention) is not "
                          "supported")
  try:
    return PixArtConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"convert.pixart: invalid config: {e}") from e


def convert_state(reader: CheckpointReader, config: PixArtConfig) -> dict[str, np.ndarray]:
  """A diffusers PixArt transformer checkpoint -> flat `{our path: array}` (see module doc)."""
  model = nnx.eval_shape(lambda: PixArtSigmaTransformer(config, rngs=nnx.Rngs(0)))
  return convert_by_name(reader, state_paths(model), name=str(reader.path))
