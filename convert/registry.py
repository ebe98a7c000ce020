"""Which model class and converter handle a checkpoint: dispatch on diffusers `_class_name` /
transformers `architectures`.

Each `convert/<model>.py` lists the source class names it handles in `MODEL_TYPES`; converters are
imported lazily, so a missing or heavy converter costs nothing until a checkpoint needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import jax.numpy as jnp
from flax import nnx

from convert.safetensors_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One supported model family.

  Attributes:
    name: our short model type ("flux"), stored in our checkpoints and accepted by `--model`.
    converter: module with `config_from_json`, `convert_state` and `MODEL_TYPES`.
    model: "module:Class" of the NNX model, built as `Class(config, dtype=, param_dtype=, rngs=)`.
    config: "module:Class" of its frozen config dataclass (with `from_dict` / `to_dict`).
  """

  name: str
  converter: str
  model: str
  config: str

  def converter_module(self) -> ModuleType:
    return importlib.import_module(self.converter)

  def model_types(self) -> tuple[str, ...]:
    return tuple(self.converter_module().MODEL_TYPES)

  def model_class(self) -> type:
    return _resolve(self.model)

  def config_class(self) -> type:
    return _resolve(self.config)

  def abstract_model(self, config: Any, *, dtype: jnp.dtype | None = None,
                     param_dtype: jnp.dtype = jnp.float32) -> nnx.Module:
    """The model built under `nnx.eval_shape`: parameters are shapes only, nothing is allocated."""
    cls = self.model_class()
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype,
                                      rngs=nnx.Rngs(0)))


def _resolve(target: str) -> Any:
  module, _, attr = target.partition(":")
  return getattr(importlib.import_module(module), attr)


ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry("flux", "convert.flux", "models.flux:FluxTransformer", "models.flux:FluxConfig"),
    ModelEntry("pixart", "convert.pixart", "models.pixart:PixArtSigmaTransformer",
               "models.pixart:PixArtConfig"),
    ModelEntry("vae", "convert.vae", "models.vae:AutoencoderKL", "models.vae:VAEConfig"),
    ModelEntry("t5", "convert.t5", "models.t5:T5Encoder", "models.t5:T5Config"),
    ModelEntry("clip", "convert.clip", "models.clip:CLIPTextModel", "models.clip:CLIPTextConfig"),
    ModelEntry("unet", "convert.sdxl", "models.unet_sdxl:UNetSDXL",
               "models.unet_sdxl:UNetSDXLConfig"),
)


def _available() -> list[tuple[ModelEntry, tuple[str, ...]]]:
  """The entries whose converter module exists, with their MODEL_TYPES (imports them)."""
  found = []
  for entry in ENTRIES:
    try:
      found.append((entry, entry.model_types()))
    except ModuleNotFoundError as e:
      if e.name != entry.converter:
        raise
  return found


def known_model_types() -> dict[str, str]:
  """`{source class name: our short name}` for every converter present."""
  return {t: entry.name for entry, types in _available() for t in types}


def _known_text() -> str:
  names = [e.name for e, _ in _available()]
  return f"known: {names} and their source classes {sorted(known_model_types())}"


def find_entry(name: str, *, where: str = "") -> ModelEntry:
  """The entry for a short name ("flux") or a source class name ("FluxTransformer2DModel").

  Raises:
    CheckpointError naming `where`, the unknown type and the known ones.
  """
  for entry, types in _available():
    if name == entry.name or name in types:
      return entry
  prefix = f"{where}: " if where else ""
  raise CheckpointError(f"{prefix}unknown model type {name!r}; {_known_text()}")


def source_class(config_json: dict) -> str | None:
  """The diffusers `_class_name` or first transformers `architectures` name of a config.json."""
  name = config_json.get("_class_name")
  if isinstance(name, str):
    return name
  architectures = config_json.get("architectures")
  if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
    return architectures[0]
  return None


def detect(config_json: dict, *, where: str) -> ModelEntry:
  """The entry for a diffusers / transformers component's config.json.

  Raises:
    CheckpointError when the config names no class or one no converter handles.
  """
  name = source_class(config_json)
  if name is None:
    raise CheckpointError(f"{where}: config.json has neither '_class_name' (diffusers) nor "
                          f"'architectures' (transformers); pass the model type; {_known_text()}")
  return find_entry(name, where=where)
