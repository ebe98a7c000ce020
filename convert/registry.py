"""Which model class and converter handle a checkpoint: dispatch on diffusers `_class_name` /
transformers `architectures`.

Each `convert/<model>.py` lists the source class names it handles in `MODEL_TYPES`; `ENTRIES`
names each family's converter module, model class and config class directly (convert sits above
models, so it imports them).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax.numpy as jnp
from flax import nnx

from convert import clip as clip_converter
from convert import flux as flux_converter
from convert import pixart as pixart_converter
from convert import sdxl as sdxl_converter
from convert import t5 as t5_converter
from convert import vae as vae_converter
from convert.safetensors_io import CheckpointError
from models.clip import CLIPTextConfig, CLIPTextModel
from models.flux import FluxConfig, FluxTransformer
from models.pixart import PixArtConfig, PixArtSigmaTransformer
from models.t5 import T5Config, T5Encoder
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig
from models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One supported model family.

  Attributes:
    name: our short model type ("flux"), stored in our checkpoints and accepted by `--model`.
    converter: module with `config_from_json`, `convert_state` and `MODEL_TYPES`.
    model: the NNX model class, built as `model(config, dtype=, param_dtype=, rngs=)`.
    config: its frozen config dataclass (with `from_dict` / `to_dict`).
  """

  name: str
  converter: ModuleType
  model: type
  config: type

  @property
  def model_path(self) -> str:
    """"module:Class" of the model class, for messages."""
    return f"{self.model.__module__}:{self.model.__qualname__}"

  def converter_module(self) -> ModuleType:
    return self.converter

  def model_types(self) -> tuple[str, ...]:
    return tuple(self.converter.MODEL_TYPES)

  def model_class(self) -> type:
    return self.model

  def config_class(self) -> type:
    return self.config

  def abstract_model(self, config: Any, *, dtype: jnp.dtype | None = None,
                     param_dtype: jnp.dtype = jnp.float32) -> nnx.Module:
    """The model built under `nnx.eval_shape`: parameters are shapes only, nothing is allocated."""
    cls = self.model
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype,
                                      rngs=nnx.Rngs(0)))


ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry("flux", flux_converter, FluxTransformer, FluxConfig),
    ModelEntry("pixart", pixart_converter, PixArtSigmaTransformer, PixArtConfig),
    ModelEntry("vae", vae_converter, AutoencoderKL, VAEConfig),
    ModelEntry("t5", t5_converter, T5Encoder, T5Config),
    ModelEntry("clip", clip_converter, CLIPTextModel, CLIPTextConfig),
    ModelEntry("unet", sdxl_converter, UNetSDXL, UNetSDXLConfig),
)


def _available() -> list[tuple[ModelEntry, tuple[str, ...]]]:
  """Every entry with its MODEL_TYPES (`ENTRIES` read at call time, so a test can add one)."""
  return [(entry, entry.model_types()) for entry in ENTRIES]


def known_model_types() -> dict[str, str]:
  """`{source class name: our short name}` for every converter."""
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


def entry_for_model(model: Any, *, where: str = "") -> ModelEntry:
  """The entry whose model class `model` is an instance of (`FluxTransformer` -> "flux").

  Raises:
    CheckpointError naming `where`, the model's class and the known ones.
  """
  for entry, _ in _available():
    if isinstance(model, entry.model_class()):
      return entry
  prefix = f"{where}: " if where else ""
  raise CheckpointError(f"{prefix}{type(model).__name__} is not a model class we convert; "
                        f"known: {[e.model for e, _ in _available()]}")


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
