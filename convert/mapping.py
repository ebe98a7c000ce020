"""Shared pieces of the checkpoint converters: key tables, checks and the torch <-> ours layout.

A converter describes a checkpoint as a key table `{checkpoint key: KeyEntry}` (built from the
config, or from the model's parameter tree with `torch_key` / `torch_shape` when our paths spell
the checkpoint keys) and hands it to `convert_tensors`, which checks the key sets, then each
tensor's shape and dtype, and returns `{our path: array}` in our layout: torch Linear weights
(out, in) become (in, out) kernels and conv weights OIHW become HWIO. The same table exports:
`export_tensors` maps our flat parameters back to checkpoint keys in torch layout. Every error is a
`CheckpointError` naming the checkpoint, the key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import jax
import ml_dtypes
import numpy as np

from convert.safetensors_io import CheckpointError

# The dtypes a float checkpoint may hold. float8 and other narrow formats are rejected: their
# exports carry scales a plain cast would ignore.
FLOAT_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.float64), np.dtype(np.float32),
                                      np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_LISTED = 20  # keys shown by `key_listing` before " ..."


class TensorSource(Protocol):
  """What the converters read: `CheckpointReader`, or any mapping-like source of numpy tensors."""

  def keys(self) -> Iterable[str]: ...

  def shape(self, key: str) -> tuple[int, ...]: ...

  def get(self, key: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class KeyEntry:
  """Where one checkpoint tensor goes.

  Attributes:
    ours: our "/"-joined parameter path.
    shape: the tensor's shape in the checkpoint (torch layout).
    transpose: True for torch Linear / conv weights, stored (out, in) / OIHW by torch and
      (in, out) / HWIO by us (see `kernel_to_ours`).
  """

  ours: str
  shape: tuple[int, ...]
  transpose: bool = False


def kernel_to_ours(weight: np.ndarray) -> np.ndarray:
  """A torch Linear (out, in) or conv OIHW weight as our (in, out) / HWIO kernel (a view)."""
  if weight.ndim == 2:
    return weight.T
  if weight.ndim == 4:
    return weight.transpose(2, 3, 1, 0)
  raise ValueError(f"kernel_to_ours: a torch weight of shape {weight.shape} is neither a Linear "
                   "(out, in) nor a conv (O, I, H, W) weight")


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """Our (in, out) / HWIO kernel as the torch Linear (out, in) / conv OIHW weight (a view; the
  inverse of `kernel_to_ours`)."""
  if kernel.ndim == 2:
    return kernel.T
  if kernel.ndim == 4:
    return kernel.transpose(3, 2, 0, 1)
  raise ValueError(f"kernel_to_torch: a kernel of shape {kernel.shape} is neither a Linear "
                   "(in, out) nor a conv (H, W, I, O) kernel")


def torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The checkpoint shape of our parameter `path` of `shape` (inverse of `kernel_to_ours`)."""
  if path.endswith("kernel") and len(shape) == 2:
    return (shape[1], shape[0])
  if path.endswith("kernel") and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


def torch_key(path: str) -> str:
  """Our "/"-path -> the torch state-dict key ("a/0/kernel" -> "a.0.weight")."""
  parts = path.split("/")
  leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join([*parts[:-1], leaf])


def key_listing(keys: list[str]) -> str:
  """`['a', 'b'] (2)`: the keys, the first 20 only (then " ..."), and how many there are.

  The one format of every key-mismatch error (converters and `convert.loading`).
  """
  more = " ..." if len(keys) > _LISTED else ""
  return f"{keys[:_LISTED]}{more} ({len(keys)})"


def check_key_sets(expected: Iterable[str], present: Iterable[str], *, name: str, what: str,
                   ignored: Iterable[str] = ()) -> None:
  """Raises a CheckpointError listing missing and unexpected keys, if there are any.

  Args:
    expected: the checkpoint keys the converter reads.
    present: the keys the checkpoint holds.
    name: the checkpoint, as errors name it (its path).
    what: what a mismatch means ("T5 encoder checkpoint does not match its config").
    ignored: present keys that are neither read nor unexpected (buffers, tied copies).
  """
  expected, present = set(expected), set(present)
  missing = sorted(expected - present)
  unexpected = sorted(present - expected - set(ignored))
  if missing or unexpected:
    raise CheckpointError(f"{name}: {what}: missing keys {key_listing(missing)}; unexpected keys "
                          f"{key_listing(unexpected)}")


def read_tensor(source: TensorSource, key: str, entry: KeyEntry, *, name: str) -> np.ndarray:
  """The tensor `key` of `source` in our layout, after checking its shape and dtype.

  Raises:
    CheckpointError: naming `name`, the key, the expected and the found shape or dtype.
  """
  found = tuple(source.shape(key))
  if found != entry.shape:
    raise CheckpointError(f"{name}: key {key!r} has shape {found}, expected {entry.shape} "
                          f"(for our {entry.ours!r})")
  tensor = source.get(key)
  if tensor.dtype not in FLOAT_DTYPES:
    raise CheckpointError(f"{name}: key {key!r} has dtype {tensor.dtype}, expected a float dtype "
                          "(float32, bfloat16, float16 or float64)")
  return kernel_to_ours(tensor) if entry.transpose else tensor


def read_tensors(source: TensorSource, table: Mapping[str, KeyEntry], *,
                 name: str) -> dict[str, np.ndarray]:
  """`{our path: array}` for every key of `table` (see `read_tensor`), in the checkpoint's dtype.

  Kernels are transposed views of the (memory-mapped) tensors: nothing is copied here.
  """
  return {entry.ours: read_tensor(source, key, entry, name=name) for key, entry in table.items()}


def convert_tensors(source: TensorSource, table: Mapping[str, KeyEntry], *, name: str,
                    what: str = "checkpoint does not match the model",
                    ignored: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Checks `source` against `table` and maps its tensors to our paths and layout.

  Args:
    source: the checkpoint tensors (a `CheckpointReader`, read one tensor at a time).
    table: checkpoint key -> `KeyEntry`.
    name: how errors name the checkpoint (its path).
    what: what a key mismatch means, for its error message.
    ignored: checkpoint keys that are skipped without being unexpected.

  Returns:
    {our path: array}, in the checkpoint's dtype (kernels are transposed views).

  Raises:
    CheckpointError: missing or unexpected keys (listed), or a tensor whose shape or dtype does not
      match (naming the key, what was expected and what was found).
  """
  check_key_sets(table, source.keys(), name=name, what=what, ignored=ignored)
  return read_tensors(source, table, name=name)


def name_table(expected: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, KeyEntry]:
  """The key table of a model whose paths spell the checkpoint keys (`torch_key`, `torch_shape`).

  Args:
    expected: our flat `{path: ShapeDtypeStruct}` (`convert.loading.state_paths` of the model).
  """
  return {torch_key(path): KeyEntry(path, torch_shape(path, tuple(struct.shape)),
                                    transpose=path.endswith("kernel"))
          for path, struct in expected.items()}


def convert_by_name(reader: TensorSource, expected: Mapping[str, jax.ShapeDtypeStruct], *,
                    name: str, rename: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
  """Reads, for each of our parameter paths, the torch tensor of the same name, in our layout.

  For models whose paths spell the checkpoint keys (`name_table`): the key table is derived from
  the model's parameter tree instead of being written out.

  Args:
    reader: the open checkpoint.
    expected: our flat `{path: ShapeDtypeStruct}` (`convert.loading.state_paths` of the model).
    name: how errors name the checkpoint (its path).
    rename: maps a checkpoint key to its current name (legacy key spellings), or None.

  Returns:
    `{path: array}` with Linear kernels (in, out) and conv kernels HWIO (transposed views of the
    memory-mapped tensors: nothing is read until the caller uses them).

  Raises:
    CheckpointError: two keys renamed to one, keys missing or unexpected (listed), a shape that
      does not match (naming the key, the expected and the found shape), or a tensor that is not
      floating point.
  """
  key_of: dict[str, str] = {}  # current name -> the checkpoint's key
  for key in reader.keys():
    current = rename(key) if rename else key
    if current in key_of:
      raise CheckpointError(f"{name}: keys {key_of[current]!r} and {key!r} both give {current!r}")
    key_of[current] = key
  table = {key_of.get(current, current): entry for current, entry in name_table(expected).items()}
  return convert_tensors(reader, table, name=name)


def export_tensors(arrays: Mapping[str, np.ndarray], table: Mapping[str, KeyEntry], *,
                   name: str) -> dict[str, np.ndarray]:
  """The reverse of `convert_tensors`: our flat `{path: array}` -> `{checkpoint key: tensor}`.

  The same key table serves both directions: each entry's `ours` path is read from `arrays` and
  put back in torch layout (`kernel_to_torch` where `transpose`), then checked against the
  entry's checkpoint shape.

  Args:
    arrays: our flat parameters (numpy arrays, any float dtype).
    table: checkpoint key -> `KeyEntry`, as the converter reads it.
    name: how errors name the model being exported.

  Returns:
    `{checkpoint key: array}` (transposed views; `convert.save_file` writes them contiguous).

  Raises:
    CheckpointError: our paths that the table does not cover or that are missing (listed), or an
      array whose shape does not give the checkpoint shape.
  """
  check_key_sets([e.ours for e in table.values()], arrays, name=name,
                 what="parameters do not match the export key table")
  out = {}
  for key, entry in table.items():
    array = arrays[entry.ours]
    tensor = kernel_to_torch(array) if entry.transpose else array
    if tuple(tensor.shape) != entry.shape:
      raise CheckpointError(f"{name}: our {entry.ours!r} of shape {tuple(array.shape)} gives "
                            f"{key!r} of shape {tuple(tensor.shape)}, expected {entry.shape}")
    out[key] = tensor
  return out
