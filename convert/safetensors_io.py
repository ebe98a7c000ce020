"""Streaming safetensors reading with numpy only (no torch): memory-mapped, bf16 via ml_dtypes.

`CheckpointReader` opens one `.safetensors` file, a folder of them (with or without a
`*.safetensors.index.json`), or an index file, and hands out tensors one at a time, so peak memory
stays about one tensor beyond what the caller keeps.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

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


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: the message names the file, the key and what was expected."""


def _read_header(path: Path) -> tuple[dict, int]:
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header (length {n}, "
                              f"file size {size})")
      header = json.loads(f.read(n))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: safetensors header is not a JSON object")
  data_start = 8 + n
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = _DTYPES[info["dtype"]]
      begin, end = info["data_offsets"]
      shape = tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{path}: bad header entry for key {key!r}: {info!r}") from e
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: key {key!r} has unsupported dtype {info['dtype']}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or data_start + end > size:
      raise CheckpointError(
          f"{path}: key {key!r} is truncated or corrupt (needs bytes {begin}..{end} of "
          f"{expected} for shape {shape} {info['dtype']}, file has {size - data_start})")
  return header, data_start


class CheckpointReader:
  """Lazy, memory-mapped access to the tensors of a safetensors checkpoint.

  `path`: a `.safetensors` file, a `*.safetensors.index.json`, or a folder holding either.
  Tensors come back as numpy arrays in their stored dtype (bf16 as `ml_dtypes.bfloat16`).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.exists():
      raise CheckpointError(f"{self.path}: no such file or folder")
    self._files = self._resolve(self.path)
    self._entries: dict[str, tuple[Path, dict, int]] = {}
    self.metadata: dict[str, str] = {}
    for file in self._files:
      header, start = _read_header(file)
      self.metadata.update(header.get("__metadata__") or {})
      for key, info in header.items():
        if key == "__metadata__":
          continue
        if key in self._entries:
          raise CheckpointError(f"{file}: key {key!r} also appears in {self._entries[key][0]}")
        self._entries[key] = (file, info, start)
    self._maps: dict[Path, np.memmap] = {}

  @staticmethod
  def _resolve(path: Path) -> list[Path]:
    if path.is_dir():
      indexes = sorted(path.glob("*.safetensors.index.json"))
      if indexes:
        return CheckpointReader._from_index(indexes[0])
      files = sorted(path.glob("*.safetensors"))
      if not files:
        raise CheckpointError(f"{path}: folder holds no .safetensors file (not a checkpoint)")
      return files
    if path.name.endswith(".index.json"):
      return CheckpointReader._from_index(path)
    return [path]

  @staticmethod
  def _from_index(index: Path) -> list[Path]:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise CheckpointError(f"{index}: shard files listed but missing: {missing}")
    return files

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def _entry(self, key: str) -> tuple[Path, dict, int]:
    try:
      return self._entries[key]
    except KeyError:
      raise CheckpointError(f"{self.path}: missing key {key!r}") from None

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entry(key)[1]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return _DTYPES[self._entry(key)[1]["dtype"]]

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a read-only memory-mapped numpy array (copy it to keep it)."""
    file, info, start = self._entry(key)
    if file not in self._maps:
      self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._maps[file][start + begin:start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

  def close(self) -> None:
    self._maps.clear()

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays (bf16 / fp8 via ml_dtypes included) as one safetensors file, atomically."""
  path = Path(path)
  header: dict = {"__metadata__": metadata} if metadata else {}
  offset = 0
  arrays = []
  for key in sorted(tensors):
    a = np.ascontiguousarray(tensors[key])
    if a.dtype not in _NAMES:
      raise CheckpointError(f"{path}: cannot store key {key!r} of dtype {a.dtype}")
    header[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                   "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)
