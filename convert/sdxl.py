"""diffusers `UNet2DConditionModel` checkpoints (SDXL, SDXL-Turbo, SD 1.x / 2.x) ->
`models.unet_sdxl.UNetSDXL`.

Our parameter paths spell the diffusers keys, so the mapping is by name (`convert_by_name`): the
model's allocation-free parameter tree lists every tensor the checkpoint must hold, Linear weights
are transposed (out, in) -> (in, out) and conv weights OIHW -> HWIO. The config.json is checked
field by field: an option that selects a code path we do not have (class embeddings, LCM's
`time_cond_proj_dim`, other block types ...) is a CheckpointError naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from convert.mapping import convert_by_name
from convert.safetensors_io import CheckpointError, CheckpointReader
from convert.state import state_paths
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig

MODEL_TYPES: tuple[str, ...] = ("UNet2DConditionModel",)

_FIELDS = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
           "mid_block_type", "block_out_channels", "layers_per_block",
           "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
           "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
           "projection_class_embeddings_input_dim", "norm_num_groups", "norm_eps",
           "flip_sin_to_cos", "freq_shift", "downsample_padding")
# diffusers' UNet2DConditionModel defaults, used where a config.json leaves a key out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, transformer_layers_per_block=1, attention_head_dim=8,
    cross_attention_dim=1280, use_linear_projection=False, addition_embed_type=None,
    addition_time_embed_dim=None, projection_class_embeddings_input_dim=None,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1)
# Keys that do not change the inference forward of the models we build.
_IGNORED_KEYS = frozenset({
    "dropout",  # inference only
    "upcast_attention",  # softmax precision; our attention logits are float32 always
    "addition_embed_type_num_heads",  # only read by the "text" addition embedding
})
# Keys whose value must be the one given (diffusers' default); others select code paths we lack.
_REQUIRED_VALUES: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "attention_type": "default",
}


def config_from_json(cfg: dict[str, Any]) -> UNetSDXLConfig:
  """Maps a diffusers `UNet2DConditionModel` config.json to a `UNetSDXLConfig`.

  Unknown keys, a value of `_REQUIRED_VALUES` other than the one given, and a config the model
  rejects (unknown block types, channels not divisible by heads or groups ...) are a
  CheckpointError naming the key.
  """
  class_name = cfg.get("_class_name", MODEL_TYPES[0])
  if class_name not in MODEL_TYPES:
    raise CheckpointError(f"convert.sdxl: config is for {class_name!r}, not one of {MODEL_TYPES}")
  known = set(_FIELDS) | _IGNORED_KEYS | set(_REQUIRED_VALUES)
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
  if unknown:
    raise CheckpointError(f"convert.sdxl: unsupported UNet2DConditionModel config keys {unknown}")
  for key, value in _REQUIRED_VALUES.items():
    if key in cfg and cfg[key] != value and not (key == "act_fn" and cfg[key] == "swish"):
      raise CheckpointError(f"convert.sdxl: config {key}={cfg[key]!r} is not supported "
                            f"(only {value!r})")
  values = {f: cfg.get(f, _DIFFUSERS_DEFAULTS[f]) for f in _FIELDS}
  for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
    if isinstance(values[key], list):
      if any(isinstance(v, list) for v in values[key]):
        raise CheckpointError(f"convert.sdxl: config {key}={values[key]!r}: per-layer lists "
                              "are not supported (one int per block)")
      values[key] = tuple(values[key])
  if not isinstance(values["cross_attention_dim"], int):
    raise CheckpointError(f"convert.sdxl: config cross_attention_dim="
                          f"{values['cross_attention_dim']!r} is not supported (one int)")
  try:
    return UNetSDXLConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"convert.sdxl: invalid UNet2DConditionModel config: {e}") from e


def convert_state(reader: CheckpointReader, config: UNetSDXLConfig) -> dict[str, np.ndarray]:
  """A diffusers UNet2DConditionModel checkpoint -> flat `{our path: array}` (see module doc)."""
  model = nnx.eval_shape(lambda: UNetSDXL(config, rngs=nnx.Rngs(0)))
  return convert_by_name(reader, state_paths(model), name=str(reader.path))
