"""`load_pretrained`: what every model's `from_pretrained` runs (registered in `models.pretrained`).

Models cannot import `convert` (it sits above them); importing this module registers
`load_pretrained` as their loader, and the `svdq_jax.loaders` entry point of pyproject.toml names it
so that a program importing only `models.flux` finds it too. The names of `convert.state` and
`convert.component` are re-exported here for the callers that know them from this module.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from convert.checkpoint import load_checkpoint
from convert.component import (
  ComponentConfig,
  checkpoint_config,
  read_component_config,
  read_config,
  read_json_object,
)
from convert.safetensors_io import CheckpointReader
from convert.state import check_arrays, load_into, path_str, state_paths
from models import pretrained

__all__ = ["ComponentConfig", "check_arrays", "checkpoint_config", "load_into", "load_pretrained",
           "path_str", "read_component_config", "read_config", "read_json_object", "state_paths"]


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
    return load_checkpoint(path, dtype=dtype)
  model = component.entry.abstract_model(component.config, dtype=dtype)
  with CheckpointReader(path) as reader:
    arrays = dict(component.entry.converter_module().convert_state(reader, component.config))
    return load_into(model, arrays, source=str(path), dtype=dtype, consume=True)


pretrained.register_loader(load_pretrained)
