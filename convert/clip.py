"""transformers `CLIPTextModel(WithProjection)` checkpoints -> `models.clip.CLIPTextModel` (numpy).

Checkpoint keys map onto our state paths (`text_model.encoder.layers.0.self_attn.q_proj.weight`
is `encoder/layers/0/self_attn/q_proj/kernel`). The `text_model.` prefix is optional: checkpoints
written by transformers before v5 (FLUX.1's and SDXL's text encoders) and every WithProjection
checkpoint carry it, a v5 `CLIPTextModel` does not. Old checkpoints may also hold the
`embeddings.position_ids` buffer, which is not a parameter and is skipped. Linear weights are
transposed from torch's (out, in) to our (in, out); LayerNorm weights become `scale`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.mapping import KeyEntry, convert_tensors
from convert.safetensors_io import CheckpointError, CheckpointReader
from models.clip import CLIPTextConfig

MODEL_TYPES: tuple[str, ...] = ("CLIPTextModel", "CLIPTextModelWithProjection")

_PREFIX = "text_model."
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
# transformers' CLIPTextConfig defaults, used where a config.json leaves a key out.
_DEFAULTS = {"max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
             "eos_token_id": 49407}
_DEFAULT_PROJECTION_DIM = 512


def config_from_json(cfg: dict[str, Any]) -> CLIPTextConfig:
  """Maps a transformers CLIP text config.json to `CLIPTextConfig`.

  `architectures` decides whether the model has a `text_projection`. Anything we cannot run (a
  full CLIPModel config, another architecture, an unknown activation) is a CheckpointError.
  """
  architectures = [a for a in cfg.get("architectures") or [] if a in MODEL_TYPES]
  if len(architectures) != 1:
    raise CheckpointError(f"CLIP converter: config.json architectures "
                          f"{cfg.get('architectures')!r} must name one of {list(MODEL_TYPES)}")
  if cfg.get("model_type", "clip_text_model") != "clip_text_model":
    raise CheckpointError(f"CLIP converter: model_type {cfg['model_type']!r} is not "
                          "'clip_text_model' (only CLIP text models are supported)")
  missing = [k for k in _REQUIRED if k not in cfg]
  if missing:
    raise CheckpointError(f"CLIP converter: config.json lacks {missing}")
  values = {k: cfg[k] for k in _REQUIRED}
  values.update({k: cfg.get(k, default) for k, default in _DEFAULTS.items()})
  with_projection = architectures[0] == "CLIPTextModelWithProjection"
  values["projection_dim"] = (cfg.get("projection_dim", _DEFAULT_PROJECTION_DIM)
                              if with_projection else None)
  try:
    return CLIPTextConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"CLIP converter: unsupported config: {e}") from e


def checkpoint_layout(config: CLIPTextConfig,
                      prefix: str = _PREFIX) -> dict[str, KeyEntry]:
  """{checkpoint key: where its tensor goes} (see `convert.mapping.KeyEntry`).

  `prefix` is put before every key of the text model ("text_model." or "").
  """
  layout: dict[str, KeyEntry] = {}
  width = config.hidden_size

  def linear(key: str, path: str, fan_in: int, fan_out: int, use_bias: bool = True) -> None:
    layout[f"{key}.weight"] = KeyEntry(f"{path}/kernel", (fan_out, fan_in), transpose=True)
    if use_bias:
      layout[f"{key}.bias"] = KeyEntry(f"{path}/bias", (fan_out,))

  def layer_norm(key: str, path: str) -> None:
    layout[f"{key}.weight"] = KeyEntry(f"{path}/scale", (width,))
    layout[f"{key}.bias"] = KeyEntry(f"{path}/bias", (width,))

  layout[f"{prefix}embeddings.token_embedding.weight"] = KeyEntry(
      "embeddings/token_embedding/embedding", (config.vocab_size, width))
  layout[f"{prefix}embeddings.position_embedding.weight"] = KeyEntry(
      "embeddings/position_embedding/embedding", (config.max_position_embeddings, width))
  for i in range(config.num_hidden_layers):
    key, path = f"{prefix}encoder.layers.{i}", f"encoder/layers/{i}"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      linear(f"{key}.self_attn.{name}", f"{path}/self_attn/{name}", width, width)
    linear(f"{key}.mlp.fc1", f"{path}/mlp/fc1", width, config.intermediate_size)
    linear(f"{key}.mlp.fc2", f"{path}/mlp/fc2", config.intermediate_size, width)
    layer_norm(f"{key}.layer_norm1", f"{path}/layer_norm1")
    layer_norm(f"{key}.layer_norm2", f"{path}/layer_norm2")
  layer_norm(f"{prefix}final_layer_norm", "final_layer_norm")
  if config.projection_dim is not None:
    linear("text_projection", "text_projection", width, config.projection_dim, use_bias=False)
  return layout


def convert_state(reader: CheckpointReader, config: CLIPTextConfig) -> dict[str, np.ndarray]:
  """Reads a CLIP text checkpoint one tensor at a time into our flat {path: array} layout.

  Raises CheckpointError listing missing or unexpected keys, or naming a key whose shape or dtype
  is wrong (with the expected and the found).
  """
  present = set(reader.keys())
  prefix = _PREFIX if any(k.startswith(_PREFIX) for k in present) else ""
  layout = checkpoint_layout(config, prefix)
  return convert_tensors(reader, layout, name=str(reader.path),
                         what="CLIP text checkpoint does not match its config",
                         ignored=[f"{prefix}embeddings.position_ids"])


WEIGHTS_FILE = "model.safetensors"


def export_table(config: CLIPTextConfig) -> dict[str, KeyEntry]:
  """The key table `convert.export` writes by: with the `text_model.` prefix, which transformers
  before and after v5 both read, for both architectures."""
  return checkpoint_layout(config, _PREFIX)


def config_to_json(config: CLIPTextConfig) -> dict[str, Any]:
  """The transformers config.json of `config` (inverse of `config_from_json`): a
  `CLIPTextModelWithProjection` when it has a projection, else a `CLIPTextModel`."""
  values = {k: getattr(config, k) for k in (*_REQUIRED, *_DEFAULTS)}
  architecture = MODEL_TYPES[0] if config.projection_dim is None else MODEL_TYPES[1]
  if config.projection_dim is not None:
    values["projection_dim"] = config.projection_dim
  return {"architectures": [architecture], "model_type": "clip_text_model", **values}
