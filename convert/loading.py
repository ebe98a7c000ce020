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
from models import pretrained, sharding

__all__ = ["ComponentConfig", "check_arrays", "checkpoint_config", "load_into", "load_pretrained",
           "path_str", "read_component_config", "read_config", "read_json_object", "state_paths"]


def load_pretrained(path: str | os.PathLike, model_type: str,
                    dtype: jnp.dtype | None = None, *, shard_weights: str | None = None,
                    devices: int | None = None) -> nnx.Module:
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
    shard_weights: "fsdp" or "channels" puts each parameter, as it is read, straight from the
      host onto its `models.sharding.param_sharding` over the first `devices` devices (default:
      all), so no device ever holds the whole model; None: the default device. Sampling with the
      same `shard_weights` and `devices` then uses the arrays as placed (the quantized layers of
      a checkpoint of ours too: they are read onto the host CPU device, then placed).

  Raises:
    CheckpointError (an InputError) naming the folder: an unknown `model_type`, a bad
    config.json, a checkpoint of ours of another family, or tensors that do not fit the config.
  """
  shardings = None
  if shard_weights is not None:
    mesh = sharding.data_mesh(devices)
    sharding.param_sharding("", (), mesh, shard_weights)  # an unknown mode fails before reading

    def shardings(name: str, shape: tuple[int, ...]):
      return sharding.param_sharding(name.rsplit("/", 1)[-1], shape, mesh, shard_weights)
  component = read_component_config(path, model_type)
  if component.checkpoint:
    return load_checkpoint(path, dtype=dtype, shardings=shardings)
  model = component.entry.abstract_model(component.config, dtype=dtype)
  with CheckpointReader(path) as reader:
    arrays = dict(component.entry.converter_module().convert_state(reader, component.config))
    return load_into(model, arrays, source=str(path), dtype=dtype, consume=True,
                     shardings=shardings)


pretrained.register_loader(load_pretrained)
