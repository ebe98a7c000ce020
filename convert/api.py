"""`convert(src, dst)`: diffusers / transformers checkpoints -> our checkpoint format.

SRC is a diffusers pipeline folder (model_index.json and one subfolder per component), a single
component folder (config.json and safetensors weights), or one `.safetensors` file with its
config.json beside it. Every model component we support is converted to our format
(`convert.checkpoint`); tokenizer, scheduler and other weight-less folders and model_index.json
are copied as they are, so the pipeline loads from DST later. All output goes to a temporary
folder beside DST, renamed at the end: a failure leaves nothing at DST.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convert import registry
from convert.checkpoint import atomic_folder, check_against_model, write_into
from convert.loading import read_component_config, read_json_object
from convert.safetensors_io import CheckpointError, CheckpointReader
from svdq_jax import is_quantized
from svdq_jax.errors import InputError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")


class _CountingReader(CheckpointReader):
  """A CheckpointReader that reports each tensor read (for the per-tensor progress bar)."""

  on_read: Callable[[], Any] = staticmethod(lambda: None)

  def get(self, key: str) -> np.ndarray:
    array = super().get(key)
    self.on_read()
    return array


def _float_dtype(dtype: Any) -> np.dtype | None:
  """`dtype` as a numpy floating dtype (None stays None); anything else is an InputError."""
  if dtype is None:
    return None
  try:
    resolved = np.dtype(jnp.dtype(dtype))
  except TypeError as e:
    raise InputError(f"dtype {dtype!r}: not a dtype ({e})") from None
  if not jnp.issubdtype(resolved, jnp.floating):
    raise InputError(f"dtype {dtype!r}: needs a floating dtype (float32, bfloat16, ...)")
  return resolved


_TILE = 256  # rows/columns per tile of the transposing copy (fits L2 at 2-4 byte elements)


def _c_order_copy(array: np.ndarray) -> np.ndarray:
  """An owned C-contiguous copy, bit for bit; a transposed 2-D view (what converters return for
  torch (out, in) -> our (in, out)) is copied tile by tile through same-width unsigned integers,
  3x faster than numpy's element-wise strided copy of ml_dtypes bfloat16."""
  if array.ndim != 2 or array.flags.c_contiguous or not array.T.flags.c_contiguous:
    return np.array(array, order="C")
  bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
  out = np.empty(array.shape, bits.dtype)
  rows, cols = array.shape
  for i in range(0, rows, _TILE):
    for j in range(0, cols, _TILE):
      out[i:i + _TILE, j:j + _TILE] = bits[i:i + _TILE, j:j + _TILE]
  return out.view(array.dtype)


def _materialize(array: Any, cast: np.dtype | None) -> np.ndarray:
  """An owned, C-contiguous copy of a converter output (often a transposed view of a memory-mapped
  tensor), cast to `cast` if floating: converting tensor by tensor releases each source mapping
  once its copy exists, so memory stays the output plus one tensor."""
  array = np.asarray(array)
  if cast is not None and jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != cast:
    return array.astype(cast, order="C")
  return _c_order_copy(array)


def convert_component(src: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                      dtype: Any = None, progress: bool = True) -> registry.ModelEntry:
  """Converts one component (folder, or safetensors file with config.json beside it) into `out`.

  `out` must be an existing empty folder (no atomicity here: `convert` provides it). The converted
  arrays are checked against the model built under `nnx.eval_shape` (keys, shapes, dtype kind)
  before anything is written.

  Returns:
    The registry entry of the converted model.
  """
  src = Path(src)
  folder = src if src.is_dir() else src.parent
  component = read_component_config(folder, model)
  if component.checkpoint:
    raise CheckpointError(f"{folder}: already a svdq-jax checkpoint; nothing to convert")
  entry, config = component.entry, component.config
  converter = entry.converter_module()
  reader = _CountingReader(src)
  with tqdm(desc=f"{entry.name} {folder.name}", total=len(reader), unit="tensor",
            disable=not progress, leave=False) as bar:
    reader.on_read = bar.update
    with reader:
      arrays = dict(converter.convert_state(reader, config))
      check_against_model(arrays, entry, config, source=str(src))
      cast = _float_dtype(dtype)
      for key, value in arrays.items():
        if not is_quantized(value):
          arrays[key] = _materialize(value, cast)
      write_into(Path(out), arrays, model_type=entry.name, config=config)
  return entry


def _pipeline_plan(src: Path) -> list[tuple[str, bool]]:
  """`[(component name, convert it?)]` from model_index.json; fails before any work is done on a
  missing component folder, a weight-holding component of an unknown type, or a truncated or
  corrupt weight file."""
  index = src / "model_index.json"
  components = read_json_object(index)
  known = registry.known_model_types()
  plan = []
  for name, spec in components.items():
    if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
      continue
    folder = src / name
    if not folder.is_dir():
      raise CheckpointError(f"{index}: component {name!r} ({spec[1]}) has no folder {folder}")
    has_weights = any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir())
    if spec[1] in known:
      CheckpointReader(folder)  # checks every header now: a bad file fails before any work
      plan.append((name, True))
    elif has_weights:
      raise CheckpointError(f"{folder}: unknown model type {spec[1]!r} for component {name!r}; "
                            f"known: {sorted(known)}")
    else:
      plan.append((name, False))
  if not any(convert for _, convert in plan):
    raise CheckpointError(f"{index}: no component of a type we convert; known: {sorted(known)}")
  return plan


def convert(src: str | os.PathLike, dst: str | os.PathLike, model: str | None = None,
            dtype: Any = None, *, overwrite: bool = False, progress: bool = True) -> Path:
  """Converts a diffusers / transformers checkpoint at `src` into our format at `dst`.

  Args:
    src: a diffusers pipeline folder (with model_index.json), a component folder (with
      config.json), or a `.safetensors` file with its config.json beside it.
    dst: the output folder; it must not exist unless `overwrite`.
    model: the model type ("flux", or a class name such as "FluxTransformer2DModel") overriding
      the config.json's `_class_name` / `architectures`; only for a single component.
    dtype: cast floating parameters to this dtype (e.g. "bfloat16"); None keeps the stored ones.
    overwrite: replace an existing `dst`.
    progress: show tqdm bars (per component, and per tensor read).

  Returns:
    The absolute path of `dst`.

  Raises:
    InputError (a ValueError) on bad input, and nothing is left at `dst` then: a `dtype` that is
    not floating, a `model` for a pipeline folder, an existing `dst` without `overwrite`;
    CheckpointError (an InputError) for the checkpoint itself: missing folder, not a checkpoint,
    unknown model type, truncated or corrupt file, missing or unexpected keys, shape or dtype
    mismatch; the message names the file, the key, what was expected and what was found.
  """
  src = Path(src)
  if not src.exists():
    raise CheckpointError(f"{src}: no such file or folder")
  _float_dtype(dtype)
  if Path(dst).exists() and not overwrite:
    raise InputError(f"{dst}: already exists (pass overwrite=True to replace it)")
  if src.is_dir() and (src / "model_index.json").exists():
    if model is not None:
      raise InputError(f"{src}: is a pipeline folder; a model type applies to one component "
                       "folder (pass e.g. SRC/transformer)")
    plan = _pipeline_plan(src)
    with atomic_folder(dst, overwrite=overwrite) as tmp:
      for name, to_convert in tqdm(plan, desc="components", unit="component",
                                   disable=not progress):
        if to_convert:
          (tmp / name).mkdir()
          convert_component(src / name, tmp / name, dtype=dtype, progress=progress)
        else:
          shutil.copytree(src / name, tmp / name)
      for name in ("model_index.json", "sample_defaults.json"):
        if (src / name).exists():
          shutil.copy2(src / name, tmp / name)
  elif src.is_dir() and not (src / "config.json").exists():
    raise CheckpointError(f"{src}: not a checkpoint (no model_index.json or config.json)")
  else:
    if src.is_file() and not src.name.endswith(".safetensors"):
      raise CheckpointError(f"{src}: not a .safetensors file or a checkpoint folder")
    with atomic_folder(dst, overwrite=overwrite) as tmp:
      convert_component(src, tmp, model=model, dtype=dtype, progress=progress)
  return Path(dst).absolute()
