"""Putting converted arrays into an NNX model, with clear errors on key, shape and dtype problems.

Converted checkpoints are flat dicts `{"path/to/param": np.ndarray}` whose paths are the NNX state
paths of our models joined with "/" (e.g. "transformer_blocks/0/attn/to_q/kernel").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.safetensors_io import CheckpointError, CheckpointReader


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def state_paths(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat `{path: ShapeDtypeStruct}` of a model's parameters (works on `nnx.eval_shape` models)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {_path_str(path): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
          for path, v in flat}


def load_into(model: nnx.Module, arrays: Mapping[str, np.ndarray], *, source: str,
              dtype: jnp.dtype | None = None) -> nnx.Module:
  """Sets every parameter of `model` from `arrays` (flat, "/"-joined paths) and returns it.

  Raises `CheckpointError` naming `source` when keys are missing or unexpected (listing them) or a
  shape does not match. `dtype` casts floating parameters (default: keep the model's dtype).
  """
  expected = state_paths(model)
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  if missing or unexpected:
    raise CheckpointError(
        f"{source}: checkpoint does not match the model: "
        f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}); "
        f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
        f"({len(unexpected)})")
  for path, spec in expected.items():
    if tuple(arrays[path].shape) != tuple(spec.shape):
      raise CheckpointError(f"{source}: key {path!r} has shape {tuple(arrays[path].shape)}, "
                            f"the model expects {tuple(spec.shape)}")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, variable in flat:
    name = _path_str(path)
    target = dtype if dtype is not None and jnp.issubdtype(expected[name].dtype, jnp.floating) \
        else expected[name].dtype
    variable.set_value(jnp.asarray(np.asarray(arrays[name]), dtype=target))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def read_config(folder: str | os.PathLike) -> dict:
  """The `config.json` of a component folder, with a clear error when it is absent or broken."""
  path = Path(folder) / "config.json"
  if not Path(folder).is_dir():
    raise CheckpointError(f"{folder}: not a folder (expected a model component folder)")
  if not path.exists():
    raise CheckpointError(f"{folder}: no config.json (not a diffusers/transformers component "
                          "folder or a svdq-jax checkpoint)")
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot parse config.json: {e}") from e


def load_pretrained(path: str | os.PathLike, *, build: Callable[[Any], nnx.Module],
                    config_from_json: Callable[[dict], Any],
                    convert_state: Callable[[CheckpointReader, Any], Mapping[str, np.ndarray]],
                    dtype: jnp.dtype | None = None) -> nnx.Module:
  """Loads a model from a diffusers/transformers component folder or from a svdq-jax checkpoint.

  `build(config)` constructs the model (it is run under `nnx.eval_shape`, so no memory is spent
  on random init); `config_from_json` maps the folder's config.json to our config;
  `convert_state(reader, config)` maps the checkpoint's tensors to flat "/"-joined paths of ours.
  A folder whose config.json carries the key "svdq_jax" is one of ours and is read by
  `convert.checkpoint.load_checkpoint` instead.
  """
  raw = read_config(path)
  if "svdq_jax" in raw:
    from convert.checkpoint import load_checkpoint  # noqa: PLC0415  (ours: orbax format)

    return load_checkpoint(path, dtype=dtype)
  config = config_from_json(raw)
  model = nnx.eval_shape(lambda: build(config))
  with CheckpointReader(path) as reader:
    arrays = convert_state(reader, config)
    return load_into(model, arrays, source=str(path), dtype=dtype)
