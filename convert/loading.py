"""Putting converted arrays into an NNX model, with clear errors on key, shape and dtype problems.

Converted checkpoints are flat dicts `{"path/to/param": np.ndarray}` whose paths are the NNX state
paths of our models joined with "/" (e.g. "transformer_blocks/0/attn/to_q/kernel").
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.safetensors_io import CheckpointError


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
