"""A pipeline folder, read and checked once: the `PipelineFolder` record loading takes.

A folder is diffusers' layout (`model_index.json` plus one folder per component) or the same
layout written by `svdq-jax quantize` / `convert` (component folders whose config.json carries our
"svdq_jax" header). Only JSON files are read here, no weight, so a command can refuse a folder or
an image size before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from convert.component import ComponentConfig, read_component_config, read_json_object
from convert.safetensors_io import CheckpointError
from models import schedulers
from pipelines.inputs import check_image_size


def flux_size_multiple(vae_config: Any, transformer_config: Any) -> int:
  """FLUX.1: the VAE's downsampling times the 2x2 packing of latents into tokens (16)."""
  return vae_config.downsample_factor * 2


def pixart_size_multiple(vae_config: Any, transformer_config: Any) -> int:
  """PixArt-Sigma: the VAE's downsampling times the transformer's patch size (16)."""
  return vae_config.downsample_factor * transformer_config.patch_size


def unet_size_multiple(vae_config: Any, unet_config: Any) -> int:
  """SDXL: the VAE's downsampling times the UNet's (8 x 4 = 32). diffusers accepts multiples of
  8 and pads inside the UNet's upsampling; `models.unet_sdxl.UNetSDXL` needs whole multiples."""
  return vae_config.downsample_factor * unet_config.downsample_factor


@dataclasses.dataclass(frozen=True)
class FolderKind:
  """What a supported pipeline class needs of its folder.

  Attributes:
    family: the `convert.registry` family of its denoiser component.
    size_multiple: `rule(vae_config, denoiser_config)`: what height and width must be
      multiples of.
    denoiser: the denoiser's component folder: "transformer" (DiTs) or "unet" (SDXL).
  """

  family: str
  size_multiple: Callable[[Any, Any], int]
  denoiser: str = "transformer"


KINDS: dict[str, FolderKind] = {
    "FluxPipeline": FolderKind("flux", flux_size_multiple),
    "PixArtSigmaPipeline": FolderKind("pixart", pixart_size_multiple),
    "StableDiffusionXLPipeline": FolderKind("unet", unet_size_multiple, denoiser="unet"),
}
"""The pipeline classes a folder's model_index.json may name."""


def read_model_index(path: str | os.PathLike) -> dict:
  """The model_index.json of a pipeline folder: `_class_name` and one entry per component.

  Raises:
    CheckpointError (an InputError) naming the folder or file: no such folder, a file, no
    model_index.json, or one that is unreadable, not UTF-8 JSON, or not a JSON object.
  """
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: pipeline folder does not exist")
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a folder (expected a pipeline folder)")
  if not (path / "model_index.json").exists():
    raise CheckpointError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
  return read_json_object(path / "model_index.json")


def _supported_name(path: Path, index: Mapping[str, Any]) -> str:
  name = index.get("_class_name")
  if name not in KINDS:
    raise CheckpointError(f"{path}: pipeline {name!r} is not supported (supported: "
                          f"{sorted(KINDS)})")
  return name


def pipeline_name(path: str | os.PathLike) -> str:
  """The pipeline class a folder's model_index.json names, checked to be one of `KINDS`.

  Raises:
    CheckpointError (an InputError) as `read_model_index`, or for a pipeline we do not have.
  """
  return _supported_name(Path(path), read_model_index(path))


SAMPLE_DEFAULTS_FILE = "sample_defaults.json"
SAMPLE_SETTINGS: dict[str, tuple[type, ...]] = {
    "height": (int,), "width": (int,), "num_inference_steps": (int,),
    "guidance_scale": (int, float), "true_cfg_scale": (int, float), "negative_prompt": (str,),
    "max_sequence_length": (int,)}
"""The pipeline call arguments a folder's sample_defaults.json may set, with their JSON types."""


def read_sample_defaults(path: Path) -> dict[str, Any]:
  """The folder's recommended sampling settings (`sample_defaults.json`, optional; {} if absent).

  A model trained for one size and sequence length (the embedded demo model: 32x32, 12 tokens,
  true classifier-free guidance) names them there, so `svdq-jax sample FOLDER --prompt ...`
  needs no further flags; flags and call arguments override them.

  Raises:
    CheckpointError naming the file: not a JSON object, an unknown key or a value of a wrong type.
  """
  file = path / SAMPLE_DEFAULTS_FILE
  if not file.exists():
    return {}
  settings = read_json_object(file)
  for key, value in settings.items():
    if key not in SAMPLE_SETTINGS:
      raise CheckpointError(f"{file}: unknown setting {key!r} (known: {sorted(SAMPLE_SETTINGS)})")
    if isinstance(value, bool) or not isinstance(value, SAMPLE_SETTINGS[key]):
      raise CheckpointError(f"{file}: {key} must be of type "
                            f"{'/'.join(t.__name__ for t in SAMPLE_SETTINGS[key])}, got {value!r}")
  return dict(settings)


def read_scheduler(path: Path) -> schedulers.Scheduler:
  """The scheduler of a pipeline folder; errors name its scheduler_config.json."""
  file = path / "scheduler" / "scheduler_config.json"
  try:
    return schedulers.scheduler_from_config(read_json_object(file))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"{file}: {e}") from e


@dataclasses.dataclass(frozen=True)
class PipelineFolder:
  """A pipeline folder's JSON files, read and checked once.

  Attributes:
    path: the folder.
    pipeline: the pipeline class its model_index.json names (a key of `KINDS`).
    model_index: the model_index.json object.
    vae: the VAE's config (`convert.component.ComponentConfig`).
    denoiser_name: the denoiser's component folder, "transformer" or "unet" (`FolderKind`).
    denoiser: its config (`convert.component.ComponentConfig`).
    scheduler: the scheduler its scheduler_config.json describes.
    size_multiple: what height and width must be multiples of for this pipeline.
    sample_defaults: the folder's recommended call arguments (`read_sample_defaults`).
  """

  path: Path
  pipeline: str
  model_index: Mapping[str, Any]
  vae: ComponentConfig
  denoiser_name: str
  denoiser: ComponentConfig
  scheduler: schedulers.Scheduler
  size_multiple: int
  sample_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def read(cls, path: str | os.PathLike | PipelineFolder) -> PipelineFolder:
    """Reads model_index.json, the scheduler's config, the VAE's and the denoiser's
    (transformer/ or unet/) config.json and sample_defaults.json if present, in this order (no
    weight); a `PipelineFolder` is returned as it is.

    Raises:
      CheckpointError (an InputError) naming the folder or file: as `read_model_index`, a
      pipeline we do not have, or a missing or invalid component or scheduler config.
    """
    if isinstance(path, PipelineFolder):
      return path
    path = Path(path)
    index = read_model_index(path)
    name = _supported_name(path, index)
    kind = KINDS[name]
    scheduler = read_scheduler(path)
    vae = read_component_config(path / "vae", "vae")
    denoiser = read_component_config(path / kind.denoiser, kind.family)
    return cls(path=path, pipeline=name, model_index=index, vae=vae, denoiser_name=kind.denoiser,
               denoiser=denoiser, scheduler=scheduler,
               size_multiple=kind.size_multiple(vae.config, denoiser.config),
               sample_defaults=read_sample_defaults(path))

  def check_image_size(self, height: int, width: int) -> None:
    """Raises InputError naming the pipeline and folder unless this pipeline can make
    height x width images."""
    check_image_size(f"{self.pipeline} in {str(self.path)!r}", height, width, self.size_multiple)
