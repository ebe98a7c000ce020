"""Ours -> diffusers / transformers: the reverse of `convert.convert`.

    export_model(model, dst)                  one float model -> a component folder
    export_pipeline(pipe_or_folder, dst)      a FluxPipeline of ours (in memory, or a pipeline
                                              folder whose models are our checkpoints) -> a
                                              diffusers FLUX.1 folder

A component folder holds the config.json diffusers' / transformers' `from_pretrained` reads
(`_class_name` and `_diffusers_version`, or `architectures` and `model_type`) and one safetensors
file (`diffusion_pytorch_model.safetensors` or `model.safetensors`) with their key names in torch
layout. The keys come from the converter's own key table (`export_table` of `convert/<model>.py`,
the table `convert_state` reads by), so one mapping serves both directions and a round trip is bit
for bit. A pipeline folder adds model_index.json, scheduler/scheduler_config.json and the two
tokenizer folders, the layout of a FLUX.1 download.

Quantized models are refused: this writes float checkpoints (a Nunchaku export is separate).
Everything is written into a temporary folder beside `dst` and renamed at the end: a failure
leaves nothing at `dst`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert import registry
from convert.api import _float_dtype
from convert.checkpoint import HEADER_KEY, atomic_folder, read_arrays, read_header
from convert.loading import checkpoint_config, path_str, read_json_object
from convert.mapping import export_tensors
from convert.safetensors_io import save_file
from models import schedulers
from models.tokenizers import Tokenizer
from svdq_jax import is_quantized
from svdq_jax.errors import InputError

# Written as `_diffusers_version`: the first diffusers release with FluxPipeline, whose folder
# layout and config names these files follow.
DIFFUSERS_VERSION = "0.30.0"

# FluxPipeline's components: (library, class) in model_index.json; models take their class from
# the exported config.json, and the registry family each slot must hold.
_FLUX_MODELS = {"transformer": "flux", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "t5"}
_FLUX_TOKENIZERS = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast"}




def _check_float(arrays: Mapping[str, Any], *, name: str) -> None:
  quantized = [path for path, value in arrays.items() if is_quantized(value)]
  if quantized:
    raise InputError(f"{name}: {len(quantized)} quantized kernels (e.g. {quantized[0]!r}); "
                     "export the float model (a Nunchaku export of 4-bit models is separate)")


def model_arrays(model: nnx.Module) -> dict[str, Any]:
  """The flat `{our path: value}` of a model's parameters (arrays, or SVDQLinears)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {path_str(path): variable.get_value() for path, variable in flat}


def _exporter(entry: registry.ModelEntry, *, name: str) -> Any:
  converter = entry.converter_module()
  if not hasattr(converter, "export_table"):
    raise InputError(f"{name}: no exporter for {entry.name!r} models ({entry.model}); exported "
                     f"are {[e.name for e in registry.ENTRIES if _has_exporter(e)]}")
  return converter


def _has_exporter(entry: registry.ModelEntry) -> bool:
  try:
    return hasattr(entry.converter_module(), "export_table")
  except ModuleNotFoundError:
    return False


def export_state(arrays: Mapping[str, Any], entry: registry.ModelEntry, config: Any, *,
                 name: str, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our flat float parameters -> `{checkpoint key: numpy tensor}` in torch layout.

  Args:
    arrays: `{our path: array}` (numpy or jax) of a model of family `entry` built from `config`.
    entry: the model family (`convert.registry`).
    config: the family's config dataclass.
    name: how errors name the model.
    dtype: cast floating tensors to this dtype; None keeps each one's own.

  Raises:
    InputError for a quantized kernel, a family without exporter or a non-float `dtype`;
    CheckpointError (an InputError) when `arrays` do not fit `config`'s key table.
  """
  _check_float(arrays, name=name)
  cast = _float_dtype(dtype)
  table = _exporter(entry, name=name).export_table(config)
  tensors = export_tensors({path: np.asarray(value) for path, value in arrays.items()}, table,
                           name=name)
  if cast is not None:
    tensors = {key: t.astype(cast) if jnp.issubdtype(t.dtype, jnp.floating) else t
               for key, t in tensors.items()}
  return tensors


def _write_component(folder: Path, arrays: Mapping[str, Any], entry: registry.ModelEntry,
                     config: Any, *, name: str, dtype: Any) -> list[str]:
  """Writes config.json and the weights into the existing `folder`; returns its model_index.json
  entry, [library, class name]."""
  converter = _exporter(entry, name=name)
  tensors = export_state(arrays, entry, config, name=name, dtype=dtype)
  try:
    config_json = converter.config_to_json(config)
  except ValueError as e:
    raise InputError(f"{name}: {e}") from e
  if "_class_name" in config_json:
    config_json = {**config_json, "_diffusers_version": DIFFUSERS_VERSION}
    library, class_name = "diffusers", config_json["_class_name"]
  else:
    floats = [t.dtype for t in tensors.values() if jnp.issubdtype(t.dtype, jnp.floating)]
    config_json = {**config_json, "dtype": np.dtype(floats[0]).name if floats else "float32"}
    library, class_name = "transformers", config_json["architectures"][0]
  save_file(tensors, folder / converter.WEIGHTS_FILE, metadata={"format": "pt"})
  (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
  return [library, class_name]


def _check_dst(dst: str | os.PathLike, overwrite: bool) -> None:
  if Path(dst).exists() and not overwrite:
    raise InputError(f"{dst}: already exists (pass overwrite=True to replace it)")


def export_model(model: nnx.Module, dst: str | os.PathLike, *, dtype: Any = None,
                 overwrite: bool = False) -> Path:
  """Writes a float model of ours as a diffusers / transformers component folder at `dst`.

  `FluxTransformer` -> FluxTransformer2DModel, `AutoencoderKL` -> AutoencoderKL, `T5Encoder` ->
  T5EncoderModel, `CLIPTextModel` -> CLIPTextModel(WithProjection): `from_pretrained(dst)` of that
  class loads it, and so does ours.

  Args:
    model: the model (float parameters in any float dtype).
    dst: the folder to create (absent, or replaced when `overwrite`).
    dtype: cast floating parameters to this dtype ("bfloat16"); None keeps the model's.
    overwrite: replace an existing `dst`.

  Returns:
    The absolute path of `dst`.

  Raises:
    InputError, and nothing is written: a model class we do not export, quantized kernels, an
    existing `dst` without `overwrite`, a non-float `dtype`, a config the target format cannot
    hold.
  """
  entry = registry.entry_for_model(model, where="export_model")
  name = f"{type(model).__name__} -> {dst}"
  _check_dst(dst, overwrite)
  arrays = model_arrays(model)
  _check_float(arrays, name=name)
  _exporter(entry, name=name)
  _float_dtype(dtype)
  with atomic_folder(dst, overwrite=overwrite) as tmp:
    _write_component(tmp, arrays, entry, model.config, name=name, dtype=dtype)
  return Path(dst).absolute()


def _checkpoint_component(folder: Path) -> tuple[registry.ModelEntry, Any, dict]:
  """(family, config, header) of our checkpoint at `folder`; quantized ones are refused."""
  header = read_header(folder)
  if header.get("quantized"):
    raise InputError(f"{folder}: a quantized checkpoint ({len(header['quantized'])} 4-bit "
                     "layers); export the float model (a Nunchaku export is separate)")
  component = checkpoint_config(folder, header)
  _exporter(component.entry, name=str(folder))
  return component.entry, component.config, header


def _is_ours(folder: Path) -> bool:
  config = folder / "config.json"
  return config.is_file() and HEADER_KEY in read_json_object(config)


def _export_folder(src: Path, tmp: Path, *, dtype: Any, progress: bool) -> None:
  """A pipeline folder (model_index.json) or one checkpoint of ours -> diffusers, into `tmp`."""
  if not (src / "model_index.json").exists():
    if not _is_ours(src):
      raise InputError(f"{src}: neither a pipeline folder (model_index.json) nor a svdq-jax "
                       "checkpoint (config.json with the 'svdq_jax' header)")
    entry, config, header = _checkpoint_component(src)
    _write_component(tmp, read_arrays(src, header), entry, config, name=str(src), dtype=dtype)
    return
  index = read_json_object(src / "model_index.json")
  names = [n for n, spec in index.items()
           if not n.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1]]
  missing = [n for n in names if not (src / n).is_dir()]
  if missing:
    raise InputError(f"{src}/model_index.json: components {missing} have no folder")
  ours = {n: _checkpoint_component(src / n) for n in names if _is_ours(src / n)}
  for name in tqdm(names, desc="components", unit="component", disable=not progress):
    if name in ours:
      entry, config, header = ours[name]
      (tmp / name).mkdir()
      index[name] = _write_component(tmp / name, read_arrays(src / name, header), entry, config,
                                     name=str(src / name), dtype=dtype)
    else:
      shutil.copytree(src / name, tmp / name)
  for file in src.iterdir():  # sample_defaults.json, a model card, a licence: as they are
    if file.is_file() and file.name != "model_index.json":
      shutil.copy2(file, tmp / file.name)
  (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _export_flux_pipeline(pipe: Any, tmp: Path, *, dtype: Any, progress: bool) -> None:
  """Our FluxPipeline (its models, tokenizers and scheduler) -> a diffusers folder in `tmp`."""
  index: dict[str, Any] = {"_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION}
  for slot, family in tqdm(_FLUX_MODELS.items(), desc="components", unit="component",
                           disable=not progress):
    model = getattr(pipe, slot)
    (tmp / slot).mkdir()
    index[slot] = _write_component(tmp / slot, model_arrays(model), registry.find_entry(family),
                                   model.config, name=f"FluxPipeline.{slot}", dtype=dtype)
  for slot, tokenizer_class in _FLUX_TOKENIZERS.items():
    (tmp / slot).mkdir()
    getattr(pipe, slot).save_pretrained(tmp / slot, tokenizer_class=tokenizer_class)
    index[slot] = ["transformers", tokenizer_class]
  scheduler = {**schedulers.scheduler_to_config(pipe.scheduler),
               "_diffusers_version": DIFFUSERS_VERSION}
  (tmp / "scheduler").mkdir()
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n",
                                                           encoding="utf-8")
  index["scheduler"] = ["diffusers", scheduler["_class_name"]]
  (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _check_flux_pipeline(pipe: Any) -> None:
  """InputError, before anything is written, unless `pipe`'s parts are what FluxPipeline needs."""
  for slot, family in _FLUX_MODELS.items():
    model = getattr(pipe, slot, None)
    entry = registry.entry_for_model(model, where=f"FluxPipeline.{slot}")
    if entry.name != family:
      raise InputError(f"FluxPipeline.{slot}: a {entry.name!r} model, expected {family!r}")
    _check_float(model_arrays(model), name=f"FluxPipeline.{slot}")
  for slot in _FLUX_TOKENIZERS:
    if not isinstance(getattr(pipe, slot, None), Tokenizer):
      raise InputError(f"FluxPipeline.{slot}: needs a models.tokenizers.Tokenizer, got "
                       f"{type(getattr(pipe, slot, None)).__name__}")
  if not isinstance(getattr(pipe, "scheduler", None), schedulers.FlowMatchEulerScheduler):
    raise InputError("FluxPipeline.scheduler: needs a FlowMatchEulerScheduler")


def export_pipeline(pipe_or_folder: Any, dst: str | os.PathLike, *, dtype: Any = None,
                    overwrite: bool = False, progress: bool = True) -> Path:
  """Writes a pipeline of ours as a diffusers pipeline folder that diffusers' `FluxPipeline.
  from_pretrained(dst)` loads, as do ours and `svdq-jax convert` / `quantize` / `sample`.

  Args:
    pipe_or_folder: our `FluxPipeline` object (models, tokenizers, scheduler in memory); or a
      folder: a pipeline folder whose model components are our checkpoints (what `svdq-jax
      convert` writes; components already in diffusers form, tokenizers, the scheduler and the
      folder's other files are copied as they are), or a single checkpoint of ours (written
      as one component folder).
    dst: the folder to create (absent, or replaced when `overwrite`).
    dtype: cast floating parameters to this dtype ("bfloat16"); None keeps the stored ones.
    overwrite: replace an existing `dst`.
    progress: a tqdm bar over the components.

  Returns:
    The absolute path of `dst`.

  Raises:
    InputError (CheckpointError included), and nothing is left at `dst`: a quantized model, an
    existing `dst` without `overwrite`, a pipeline other than FluxPipeline, a model of a type we
    do not export, a missing or broken folder or checkpoint.
  """
  _check_dst(dst, overwrite)
  _float_dtype(dtype)
  if isinstance(pipe_or_folder, str | os.PathLike):
    src = Path(pipe_or_folder)
    if not src.is_dir():
      raise InputError(f"{src}: no such folder")
    with atomic_folder(dst, overwrite=overwrite) as tmp:
      _export_folder(src, tmp, dtype=dtype, progress=progress)
    return Path(dst).absolute()
  if type(pipe_or_folder).__name__ != "FluxPipeline":
    raise InputError(f"export_pipeline: a {type(pipe_or_folder).__name__}; exported are our "
                     "FluxPipeline objects and pipeline or checkpoint folders")
  _check_flux_pipeline(pipe_or_folder)
  with atomic_folder(dst, overwrite=overwrite) as tmp:
    _export_flux_pipeline(pipe_or_folder, tmp, dtype=dtype, progress=progress)
  return Path(dst).absolute()
