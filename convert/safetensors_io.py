"""Streaming safetensors reading and writing with numpy only (no torch).

`CheckpointReader` opens one `.safetensors` file, a folder of them (with or without a
`*.safetensors.index.json`), or an index file, validates every header up front (so a truncated or
corrupt file fails at open, naming the file and the key), and hands out tensors one at a time as
memory-mapped arrays: peak memory stays about one tensor beyond what the caller keeps. bf16 and fp8
come back as `ml_dtypes` arrays.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from svdq_jax.errors import InputError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(InputError):
  """A checkpoint that cannot be read: the message names the file, the key and what was expected.

  An `InputError` (so a ValueError): the checkpoint is the user's input.
  """


class _Entry:
  """Where one tensor lives: its file, dtype, shape and absolute byte range."""

  __slots__ = ("file", "dtype", "shape", "begin", "end")

  def __init__(self, file: Path, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int):
    self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def _parse_entry(path: Path, key: str, info: object, data_start: int, size: int) -> _Entry:
  """Validates one header entry against the file size; raises CheckpointError naming the key."""
  if not isinstance(info, dict):
    raise CheckpointError(f"{path}: bad header entry for key {key!r}: {info!r}")
  name = info.get("dtype")
  if name not in _DTYPES:
    raise CheckpointError(f"{path}: key {key!r} has unsupported dtype {name!r} "
                          f"(supported: {sorted(_DTYPES)})")
  shape, offsets = info.get("shape"), info.get("data_offsets")
  if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
      or not isinstance(offsets, list) or len(offsets) != 2
      or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
    raise CheckpointError(f"{path}: bad header entry for key {key!r}: shape {shape!r}, "
                          f"data_offsets {offsets!r}")
  dtype = _DTYPES[name]
  begin, end = offsets
  needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if end - begin != needed:
    raise CheckpointError(f"{path}: key {key!r} is corrupt: shape {tuple(shape)} {name} needs "
                          f"{needed} bytes, its data_offsets span {end - begin}")
  if data_start + end > size:
    raise CheckpointError(f"{path}: truncated: key {key!r} needs bytes up to {data_start + end}, "
                          f"the file has {size}")
  return _Entry(path, dtype, tuple(shape), data_start + begin, data_start + end)


def _read_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
  """The validated entries and the `__metadata__` of one safetensors file."""
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: not a safetensors file, or truncated: header length {n}, "
                              f"file size {size}")
      header = json.loads(f.read(n))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
  entries = {key: _parse_entry(path, key, info, 8 + n, size) for key, info in header.items()}
  return entries, metadata


def _weight_files(folder: Path) -> list[Path]:
  """The safetensors files of a folder without an index; variants (`x.fp16.safetensors`) are
  used only when no plain file is there, since diffusers folders may hold both."""
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.ckpt")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {others}: pickled torch weights are not read; save with safetensors)" \
        if others else ""
    raise CheckpointError(f"{folder}: holds no .safetensors file, not a checkpoint{hint}")
  plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
  return plain or files


def _index_files(index: Path) -> tuple[list[Path], dict[str, str]]:
  """The shard files and the key -> file-name map of a `*.safetensors.index.json`."""
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
  files = sorted({index.parent / f for f in weight_map.values()})
  missing = [str(f) for f in files if not f.exists()]
  if missing:
    raise CheckpointError(f"{index}: shard files listed but missing: {missing}")
  return files, weight_map


class CheckpointReader:
  """Lazy, memory-mapped access to the tensors of a safetensors checkpoint.

  Args:
    path: a `.safetensors` file, a `*.safetensors.index.json`, or a folder holding either.

  Tensors come back as read-only numpy arrays in their stored dtype (bf16 as `ml_dtypes.bfloat16`);
  all headers are checked at construction, so later reads do not fail on a bad file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.exists():
      raise CheckpointError(f"{self.path}: no such file or folder")
    self._entries: dict[str, _Entry] = {}
    self.metadata: dict[str, str] = {}
    index: Path | None = None
    if self.path.is_dir():
      indexes = sorted(self.path.glob("*.safetensors.index.json"))
      if len(indexes) > 1:
        raise CheckpointError(f"{self.path}: several safetensors indexes "
                              f"{[p.name for p in indexes]}; pass the one to read")
      index = indexes[0] if indexes else None
    elif self.path.name.endswith(".index.json"):
      index = self.path
    weight_map: dict[str, str] = {}
    if index is not None:
      files, weight_map = _index_files(index)
    else:
      files = _weight_files(self.path) if self.path.is_dir() else [self.path]
    for file in files:
      entries, metadata = _read_header(file)
      self.metadata.update(metadata)
      for key, entry in entries.items():
        if key in self._entries:
          raise CheckpointError(f"{file}: key {key!r} also appears in {self._entries[key].file}")
        self._entries[key] = entry
    if index is not None:
      self._check_index(index, weight_map)
    self.files: tuple[Path, ...] = tuple(files)

  def _check_index(self, index: Path, weight_map: dict[str, str]) -> None:
    """Every key the index lists must be in the shard it names."""
    wrong = [k for k, f in weight_map.items()
             if k not in self._entries or self._entries[k].file.name != Path(f).name]
    if wrong:
      raise CheckpointError(f"{index}: keys not found in the shard the index names: "
                            f"{sorted(wrong)[:20]} ({len(wrong)})")

  def keys(self) -> list[str]:
    """Every tensor name, over all files."""
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def _entry(self, key: str) -> _Entry:
    try:
      return self._entries[key]
    except KeyError:
      raise CheckpointError(f"{self.path}: missing key {key!r}") from None

  def shape(self, key: str) -> tuple[int, ...]:
    """The stored shape of tensor `key` (from the header; nothing is read)."""
    return self._entry(key).shape

  def dtype(self, key: str) -> np.dtype:
    """The stored dtype of tensor `key` (bf16 / fp8 as `ml_dtypes` dtypes)."""
    return self._entry(key).dtype

  def nbytes(self, key: str | None = None) -> int:
    """Bytes of tensor `key`, or of all tensors when `key` is None."""
    if key is not None:
      entry = self._entry(key)
      return entry.end - entry.begin
    return sum(e.end - e.begin for e in self._entries.values())

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a read-only memory-mapped numpy array (copy it to keep it).

    Each call maps only that tensor's bytes, and the mapping goes away with the array, so reading
    a checkpoint tensor by tensor keeps resident memory at about one tensor.
    """
    entry = self._entry(key)
    if entry.end == entry.begin:
      return np.zeros(entry.shape, entry.dtype)
    try:
      return np.memmap(entry.file, dtype=entry.dtype, mode="r", offset=entry.begin,
                       shape=entry.shape)
    except (OSError, ValueError) as e:  # the file changed or vanished since it was opened
      raise CheckpointError(f"{entry.file}: cannot read key {key!r}: {e}") from e

  def close(self) -> None:
    """Nothing to release (mappings live as long as the arrays); kept for `with` blocks."""

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays (bf16 / fp8 via ml_dtypes included) as one safetensors file, atomically.

  Arrays are written one at a time (a non-contiguous one is copied alone), so memory stays about
  one tensor beyond the inputs. The file appears at `path` only once complete.
  """
  keys = sorted(tensors)
  specs = {key: TensorSpec(np.dtype(tensors[key].dtype), tuple(tensors[key].shape))
           for key in keys}
  save_file_streamed(specs, ((key, tensors[key]) for key in keys), path, metadata)


class TensorSpec(NamedTuple):
  """The dtype and shape one tensor of a file will have."""

  dtype: np.dtype
  shape: tuple[int, ...]


def save_file_streamed(specs: Mapping[str, TensorSpec], tensors: Iterable[tuple[str, np.ndarray]],
                       path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file whose tensors are produced one by one, atomically.

  The header comes from `specs` (key -> dtype and shape, in file order), so `tensors` may be a
  generator that makes each array only when it is written: memory stays one array (or whatever
  the generator holds) whatever the file's size. `tensors` must yield every key of `specs` once, in
  that order, with that dtype and shape (anything else is a bug of the caller: ValueError). The
  file appears at `path` only once complete; on any exception nothing is left behind.

  Raises:
    CheckpointError for a key or dtype safetensors cannot hold.
  """
  path = Path(path)
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for key, spec in specs.items():
    if not isinstance(key, str) or key == "__metadata__":
      raise CheckpointError(f"{path}: invalid tensor name {key!r}")
    dtype = np.dtype(spec.dtype)
    if dtype not in _NAMES:
      raise CheckpointError(f"{path}: cannot store key {key!r} of dtype {dtype}")
    nbytes = dtype.itemsize * int(np.prod(spec.shape, dtype=np.int64))
    header[key] = {"dtype": _NAMES[dtype], "shape": list(spec.shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      expected = iter(specs.items())
      for key, array in tensors:
        want_key, spec = next(expected, (None, None))
        if key != want_key or np.dtype(array.dtype) != np.dtype(spec.dtype) or tuple(
            array.shape) != tuple(spec.shape):
          want = "nothing more" if want_key is None else f"{want_key!r} {spec}"
          raise ValueError(f"save_file_streamed: got {key!r} {np.dtype(array.dtype)}"
                           f"{tuple(array.shape)}, the header announced {want}")
        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
      missing = next(expected, None)
      if missing is not None:
        raise ValueError(f"save_file_streamed: {missing[0]!r} and later keys were never produced")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
