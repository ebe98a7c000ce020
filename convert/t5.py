"""transformers `T5EncoderModel` checkpoints -> `models.t5.T5Encoder` parameters (numpy only).

Checkpoint keys map onto our state paths (`encoder.block.0.layer.0.SelfAttention.q.weight`
is `encoder/block/0/layer/0/SelfAttention/q/kernel`).
Linear weights are transposed from torch's (out, in) to our (in, out), norm weights become
`scale`, embeddings `embedding`. The token embedding is tied in transformers: a checkpoint may
hold `shared.weight`, `encoder.embed_tokens.weight` or both, and any of these loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.mapping import KeyEntry, check_key_sets, read_tensor, read_tensors
from convert.safetensors_io import CheckpointError, CheckpointReader
from models.t5 import T5Config

MODEL_TYPES: tuple[str, ...] = ("T5EncoderModel",)

_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
# transformers' T5Config defaults, used where an (older) config.json leaves a key out.
_DEFAULTS = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
             "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu"}


def config_from_json(cfg: dict[str, Any]) -> T5Config:
  """Maps a transformers T5 config.json to `T5Config`; what we cannot run is a CheckpointError."""
  architectures = cfg.get("architectures") or []
  if architectures and not set(architectures) & set(MODEL_TYPES):
    raise CheckpointError(f"T5 converter: architectures {architectures} are not supported "
                          f"(this converter reads {list(MODEL_TYPES)})")
  if cfg.get("model_type", "t5") != "t5":
    raise CheckpointError(f"T5 converter: model_type {cfg['model_type']!r} is not 't5'")
  if cfg.get("is_decoder"):
    raise CheckpointError("T5 converter: config has is_decoder=true; only the encoder is supported")
  missing = [k for k in _REQUIRED if k not in cfg]
  if missing:
    raise CheckpointError(f"T5 converter: config.json lacks {missing}")
  values = {k: cfg[k] for k in _REQUIRED}
  values.update({k: cfg.get(k, default) for k, default in _DEFAULTS.items()})
  try:
    return T5Config(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"T5 converter: unsupported config: {e}") from e


def checkpoint_layout(config: T5Config) -> dict[str, KeyEntry]:
  """{checkpoint key: where its tensor goes} (see `convert.mapping.KeyEntry`).

  The token embedding is listed under `shared.weight`.
  """
  layout: dict[str, KeyEntry] = {}

  def linear(key: str, path: str, fan_in: int, fan_out: int) -> None:
    layout[f"{key}.weight"] = KeyEntry(f"{path}/kernel", (fan_out, fan_in), transpose=True)

  def norm(key: str, path: str) -> None:
    layout[f"{key}.weight"] = KeyEntry(f"{path}/scale", (config.d_model,))

  d_model, inner = config.d_model, config.num_heads * config.d_kv
  layout["shared.weight"] = KeyEntry("shared/embedding", (config.vocab_size, d_model))
  for i in range(config.num_layers):
    attn_key, attn_path = f"encoder.block.{i}.layer.0", f"encoder/block/{i}/layer/0"
    for name in ("q", "k", "v"):
      linear(f"{attn_key}.SelfAttention.{name}", f"{attn_path}/SelfAttention/{name}", d_model,
             inner)
    linear(f"{attn_key}.SelfAttention.o", f"{attn_path}/SelfAttention/o", inner, d_model)
    if i == 0:
      layout[f"{attn_key}.SelfAttention.relative_attention_bias.weight"] = KeyEntry(
          f"{attn_path}/SelfAttention/relative_attention_bias/embedding",
          (config.relative_attention_num_buckets, config.num_heads))
    norm(f"{attn_key}.layer_norm", f"{attn_path}/layer_norm")
    ff_key, ff_path = f"encoder.block.{i}.layer.1", f"encoder/block/{i}/layer/1"
    for name in ("wi_0", "wi_1") if config.is_gated_act else ("wi",):
      linear(f"{ff_key}.DenseReluDense.{name}", f"{ff_path}/DenseReluDense/{name}", d_model,
             config.d_ff)
    linear(f"{ff_key}.DenseReluDense.wo", f"{ff_path}/DenseReluDense/wo", config.d_ff, d_model)
    norm(f"{ff_key}.layer_norm", f"{ff_path}/layer_norm")
  norm("encoder.final_layer_norm", "encoder/final_layer_norm")
  return layout


def convert_state(reader: CheckpointReader, config: T5Config) -> dict[str, np.ndarray]:
  """Reads a T5 encoder checkpoint one tensor at a time into our flat {path: array} layout.

  Raises CheckpointError listing missing or unexpected keys, or naming a key whose shape or dtype
  is wrong (with the expected and the found).
  """
  layout = checkpoint_layout(config)
  present = set(reader.keys())
  embedding_keys = [k for k in _EMBEDDING_KEYS if k in present]
  if embedding_keys:
    layout[embedding_keys[0]] = layout.pop("shared.weight")
  tied_copies = embedding_keys[1:]
  name = str(reader.path)
  check_key_sets(layout, present, name=name, ignored=tied_copies,
                 what="T5 encoder checkpoint does not match its config")
  for key in tied_copies:
    read_tensor(reader, key, layout[embedding_keys[0]], name=name)
  return read_tensors(reader, layout, name=name)


WEIGHTS_FILE = "model.safetensors"


def export_table(config: T5Config) -> dict[str, KeyEntry]:
  """The key table `convert.export` writes by: the token embedding once, as `shared.weight`
  (transformers ties `encoder.embed_tokens.weight` to it on load)."""
  return checkpoint_layout(config)


def config_to_json(config: T5Config) -> dict[str, Any]:
  """The transformers `T5EncoderModel` config.json of `config` (inverse of `config_from_json`)."""
  values = {k: getattr(config, k) for k in (*_REQUIRED, *_DEFAULTS)}
  return {"architectures": list(MODEL_TYPES), "model_type": "t5", "is_encoder_decoder": False,
          **values}
