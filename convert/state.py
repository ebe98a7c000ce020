"""Putting converted arrays into an NNX model, with clear errors on key, shape and dtype problems.

Converted checkpoints are flat dicts `{"path/to/param": np.ndarray}` whose paths are the NNX state
paths of our models joined with "/" (e.g. "transformer_blocks/0/attn/to_q/kernel").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.mapping import key_listing
from convert.safetensors_io import CheckpointError
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


def _place_layer(name: str, layer: Any, shardings: Callable[[str, tuple[int, ...]], Any]) -> Any:
  """A quantized layer with each of its arrays put at `shardings("<name>/<field>", shape)`."""
  def place(path, x):
    field = getattr(path[-1], "name", getattr(path[-1], "key", ""))
    return jax.device_put(np.asarray(x), shardings(f"{name}/{field}", tuple(x.shape)))
  return jax.tree_util.tree_map_with_path(place, layer)


def load_into(model: nnx.Module, arrays: Mapping[str, Any], *, source: str,
              dtype: jnp.dtype | None = None, keep_stored_dtype: bool = False,
              consume: bool = False,
              shardings: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None
              ) -> nnx.Module:
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
    shardings: `shardings(path, shape)` places each array, as it is set, straight from the host
      at that sharding (`models.sharding.param_sharding`): no device ever holds the whole model.
      An `SVDQLinear`'s arrays get the paths "<kernel path>/qweight", ".../wscales", ... None: the
      default device.

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
      variable.set_value(value if shardings is None else _place_layer(name, value, shardings))
      continue
    target = expected[name].dtype
    if jnp.issubdtype(target, jnp.floating):
      target = dtype if dtype is not None else value.dtype if keep_stored_dtype else target
    if shardings is None:
      variable.set_value(jnp.asarray(np.asarray(value), dtype=target))
    else:
      host = np.asarray(value).astype(np.dtype(target), copy=False)
      variable.set_value(jax.device_put(host, shardings(name, tuple(host.shape))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model
