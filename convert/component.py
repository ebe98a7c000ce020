"""What a component folder's config.json says, read without touching its weights.

A config.json with the "svdq_jax" header (`HEADER_KEY`) is our checkpoint (`convert.checkpoint`),
whose header names the model family and holds its config; any other is a diffusers /
transformers config.json, mapped to our config by the family's `config_from_json`. These are the
rules `convert.loading.load_pretrained` (every `Model.from_pretrained`), `convert.api.convert`
and the pipelines read folders by.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convert import registry
from convert.safetensors_io import CheckpointError

FORMAT_VERSION = 1
HEADER_KEY = "svdq_jax"
PARAMS_DIR = "params"
# The JSON type of each header entry (a hand-edited config.json may hold another).
_HEADER_TYPES = {"format_version": (int, "integer"), "model_type": (str, "string"),
                 "config": (dict, "object"), "quantized": (dict, "object"),
                 "empty": (dict, "object")}


def read_json_object(file: str | os.PathLike) -> dict:
  """The JSON object a file holds (config.json, model_index.json, scheduler_config.json, ...).

  Raises:
    CheckpointError naming the file when it is missing or not a file, unreadable, not UTF-8
    JSON, or holds something other than an object.
  """
  file = Path(file)
  if not file.is_file():
    raise CheckpointError(f"{file}: missing (or not a file)")
  try:
    content = json.loads(file.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: cannot parse {file.name}: {e}") from e
  if not isinstance(content, dict):
    raise CheckpointError(f"{file}: not a JSON object (it holds a {type(content).__name__})")
  return content


def read_config(folder: str | os.PathLike) -> dict:
  """The `config.json` of a component folder, with a clear error when it is absent or broken."""
  if not Path(folder).is_dir():
    raise CheckpointError(f"{folder}: not a folder (expected a model component folder)")
  if not (Path(folder) / "config.json").exists():
    raise CheckpointError(f"{folder}: no config.json (not a diffusers/transformers component "
                          "folder or a svdq-jax checkpoint)")
  return read_json_object(Path(folder) / "config.json")


def _config_of_folder(folder: str | os.PathLike, raw: dict,
                      config_from_json: Callable[[dict], Any]) -> Any:
  """`config_from_json(raw)` for the config.json `raw` of `folder`; a bad config is a
  CheckpointError naming that file (the converters' messages name only the field)."""
  try:
    return config_from_json(raw)
  except ValueError as e:  # CheckpointError included
    where = str(Path(folder) / "config.json")
    raise CheckpointError(str(e) if where in str(e) else f"{where}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ComponentConfig:
  """What a component folder's config.json says, read without touching its weights.

  Attributes:
    entry: the model family (`convert.registry`).
    config: the family's config dataclass (`FluxConfig`, `VAEConfig`, ...).
    checkpoint: True for a svdq-jax checkpoint (`convert.checkpoint`), False for a
      diffusers / transformers folder.
  """

  entry: registry.ModelEntry
  config: Any
  checkpoint: bool


def checkpoint_config(path: str | os.PathLike, header: dict) -> ComponentConfig:
  """The family and config a svdq-jax checkpoint's "svdq_jax" `header` (its `read_header`) names.

  Raises:
    CheckpointError naming `path` for an unknown model type or a config the family rejects.
  """
  entry = registry.find_entry(header["model_type"], where=str(path))
  try:
    config = entry.config_class().from_dict(header["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: invalid {entry.name!r} config in config.json: {e}") from e
  return ComponentConfig(entry, config, checkpoint=True)


def read_component_config(folder: str | os.PathLike, model_type: str | None = None
                          ) -> ComponentConfig:
  """The model config of a component folder, from its config.json alone (no weight is read).

  The rules `load_pretrained` (and so every `Model.from_pretrained`) and `convert.api.convert`
  load by: a config.json with the "svdq_jax" header is our checkpoint, whose header names the
  family and holds the config (`checkpoint_config`); any other is a diffusers / transformers
  config.json, mapped to our config by the family's `config_from_json`.

  Args:
    folder: the component folder (e.g. "FLUX.1-dev/vae").
    model_type: the family, a `convert.registry` name or source class name ("vae",
      "AutoencoderKL"); None: the one the checkpoint's header or the config.json's `_class_name`
      / `architectures` names.

  Raises:
    CheckpointError (an InputError) naming the folder or its config.json: no folder, no or a
    broken config.json, an unknown model type, a checkpoint of ours of another family than
    `model_type`, or a config the family rejects.
  """
  wanted = registry.find_entry(model_type, where=str(folder)) if model_type else None
  raw = read_config(folder)
  if HEADER_KEY in raw:
    component = checkpoint_config(folder, read_header(folder))
    if wanted is not None and component.entry != wanted:
      raise CheckpointError(f"{folder}: a svdq-jax checkpoint of a {component.entry.name!r} model "
                            f"({component.entry.model_path}), but this loader reads "
                            f"{wanted.name!r} ({wanted.model_path})")
    return component
  entry = wanted or registry.detect(raw, where=str(Path(folder) / "config.json"))
  config = _config_of_folder(folder, raw, entry.converter_module().config_from_json)
  return ComponentConfig(entry, config, checkpoint=False)


def read_header(path: str | os.PathLike) -> dict:
  """The "svdq_jax" header of our checkpoint folder, validated.

  Raises:
    CheckpointError when the folder is not ours, its header lacks an entry or holds one of the
    wrong JSON type, or it is from a newer format version.
  """
  raw = read_config(path)
  header = raw.get(HEADER_KEY)
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: config.json has no '{HEADER_KEY}' header (not a svdq-jax "
                          "checkpoint; convert it with `svdq-jax convert`)")
  missing = [k for k in ("format_version", "model_type", "config") if k not in header]
  if missing:
    raise CheckpointError(f"{path}: config.json '{HEADER_KEY}' header lacks {missing}")
  wrong = [f"{key!r} must be a JSON {json_type}, got {json.dumps(header[key])[:60]}"
           for key, (kind, json_type) in _HEADER_TYPES.items()
           if key in header and not isinstance(header[key], kind)]
  if wrong:
    raise CheckpointError(f"{path}: config.json '{HEADER_KEY}' header: {'; '.join(wrong)}")
  if header["format_version"] > FORMAT_VERSION:
    raise CheckpointError(f"{path}: checkpoint format version {header['format_version']}, this "
                          f"svdq-jax reads up to {FORMAT_VERSION}")
  if not (Path(path) / PARAMS_DIR).is_dir():
    raise CheckpointError(f"{path}: no '{PARAMS_DIR}' folder (incomplete checkpoint)")
  return header
