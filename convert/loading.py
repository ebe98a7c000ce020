"""Putting converted arrays into an NNX model, with clear errors on key, shape and dtype problems,
and reading a component folder's config (`read_component_config`) by the rules loading uses.

Converted checkpoints are flat dicts `{"path/to/param": np.ndarray}` whose paths are the NNX state
paths of our models joined with "/" (e.g. "transformer_blocks/0/attn/to_q/kernel").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import registry
from convert.mapping import key_listing
from convert.safetensors_io import CheckpointError, CheckpointReader
from svdq_jax import is_quantized


def path_str(path: tuple) -> str:
  """An NNX / pytree key path as our "/"-joined string ("transformer_blocks/0/attn/to_q")."""
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _spec(value: Any) -> jax.ShapeDtypeStruct:
  """Shape and dtype of a parameter value; an SVDQLinear reports the (in, out) shape of the kernel
  it replaces and a float dtype (bfloat16), so it checks like that float kernel."""
  if is_quantized(value):
    return jax.ShapeDtypeStruct(tuple(value.shape), jnp.bfloat16)
  return jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)


def state_paths(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat `{path: ShapeDtypeStruct}` of a model's parameters (works on `nnx.eval_shape` models)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {path_str(path): _spec(v.get_value()) for path, v in flat}


def check_arrays(expected: Mapping[str, jax.ShapeDtypeStruct], arrays: Mapping[str, Any], *,
                 source: str) -> None:
  """Raises `CheckpointError` naming `source` unless `arrays` has exactly the expected keys with
  the expected shapes and a compatible kind of dtype (float for float, integer for integer).

  Values may be numpy/jax arrays, `ShapeDtypeStruct`s or `SVDQLinear`s (checked by their
  (in, out) shape).
  """
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  if missing or unexpected:
    raise CheckpointError(f"{source}: checkpoint does not match the model: missing keys "
                          f"{key_listing(missing)}; unexpected keys {key_listing(unexpected)}")
  for path, spec in expected.items():
    found = _spec(arrays[path])
    if tuple(found.shape) != tuple(spec.shape):
      raise CheckpointError(f"{source}: key {path!r} has shape {tuple(found.shape)}, "
                            f"the model expects {tuple(spec.shape)}")
    want_float = jnp.issubdtype(spec.dtype, jnp.floating)
    if want_float != jnp.issubdtype(found.dtype, jnp.floating):
      raise CheckpointError(f"{source}: key {path!r} has dtype {np.dtype(found.dtype)}, the model "
                            f"expects {'a floating' if want_float else 'an integer'} dtype like "
                            f"{np.dtype(spec.dtype)}")


def load_into(model: nnx.Module, arrays: Mapping[str, Any], *, source: str,
              dtype: jnp.dtype | None = None, keep_stored_dtype: bool = False,
              consume: bool = False) -> nnx.Module:
  """Sets every parameter of `model` from `arrays` (flat, "/"-joined paths) and returns it.

  Args:
    model: the model to fill, typically built under `nnx.eval_shape`.
    arrays: `{path: array}`; a value may also be an `SVDQLinear` replacing a kernel.
    source: the file or folder the arrays came from, for error messages.
    dtype: cast floating parameters to this dtype; None keeps the model's parameter dtype, or the
      stored dtype when `keep_stored_dtype`.
    keep_stored_dtype: with `dtype` None, keep each array's own dtype (no up-cast of bf16 data).
    consume: delete each entry of `arrays` (a dict) once placed, so that peak memory is the model
      plus one tensor rather than twice the model.

  Raises:
    CheckpointError naming `source` when keys are missing or unexpected (listing them), or a
    shape or kind of dtype does not match.
  """
  expected = state_paths(model)
  check_arrays(expected, arrays, source=source)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, variable in flat:
    name = path_str(path)
    value = arrays.pop(name) if consume else arrays[name]
    if is_quantized(value):
      variable.set_value(value)
      continue
    target = expected[name].dtype
    if jnp.issubdtype(target, jnp.floating):
      target = dtype if dtype is not None else value.dtype if keep_stored_dtype else target
    variable.set_value(jnp.asarray(np.asarray(value), dtype=target))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


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
  from convert.checkpoint import HEADER_KEY, read_header  # noqa: PLC0415  (it imports us)

  wanted = registry.find_entry(model_type, where=str(folder)) if model_type else None
  raw = read_config(folder)
  if HEADER_KEY in raw:
    component = checkpoint_config(folder, read_header(folder))
    if wanted is not None and component.entry != wanted:
      raise CheckpointError(f"{folder}: a svdq-jax checkpoint of a {component.entry.name!r} model "
                            f"({component.entry.model}), but this loader reads {wanted.name!r} "
                            f"({wanted.model})")
    return component
  entry = wanted or registry.detect(raw, where=str(Path(folder) / "config.json"))
  config = _config_of_folder(folder, raw, entry.converter_module().config_from_json)
  return ComponentConfig(entry, config, checkpoint=False)


def load_pretrained(path: str | os.PathLike, model_type: str,
                    dtype: jnp.dtype | None = None) -> nnx.Module:
  """Loads a model from a diffusers/transformers component folder or from a svdq-jax checkpoint.

  What every model's `from_pretrained` does. The folder's config is read by
  `read_component_config`; a checkpoint of ours (config.json with the key "svdq_jax") is read by
  `convert.checkpoint.load_checkpoint`. Otherwise the model is built under `nnx.eval_shape`
  (nothing is spent on random init) and filled by the family's `convert_state`, tensor by tensor.

  Args:
    path: the component folder.
    model_type: the family, a `convert.registry` name ("flux", "pixart", "vae", "t5", "clip").
    dtype: the computation dtype and the dtype floating parameters are cast to; None: float32
      parameters (a checkpoint of ours keeps its stored dtypes) and computation in the input's
      dtype.

  Raises:
    CheckpointError (an InputError) naming the folder: an unknown `model_type`, a bad
    config.json, a checkpoint of ours of another family, or tensors that do not fit the config.
  """
  component = read_component_config(path, model_type)
  if component.checkpoint:
    from convert.checkpoint import load_checkpoint  # noqa: PLC0415

    return load_checkpoint(path, dtype=dtype)
  model = component.entry.abstract_model(component.config, dtype=dtype)
  with CheckpointReader(path) as reader:
    arrays = dict(component.entry.converter_module().convert_state(reader, component.config))
    return load_into(model, arrays, source=str(path), dtype=dtype, consume=True)
