"""Our checkpoint format: an orbax-checkpoint folder of the flat parameter arrays and a config.json.

Layout of a checkpoint folder DST:

    DST/config.json   {"svdq_jax": {"format_version", "model_type", "config", "quantized",
                                    "empty"}}
    DST/params/       orbax PyTree checkpoint; each parameter path "a/b/kernel" is the nested
                      dict entry params["a"]["b"]["kernel"]; a quantized kernel is a dict of its
                      SVDQLinear array fields ("qweight", "wscales", ...)

"model_type" is the registry's short name ("flux"); "config" the model config's `to_dict()`;
"quantized" maps the path of each quantized kernel to its `SVDQLinear.metadata()`; "empty" maps
the path of each zero-size array (orbax cannot store one, e.g. a rank-0 low-rank branch) to its
shape and dtype. The key "svdq_jax" is what `convert.loading.load_pretrained` (and so every
`Model.from_pretrained`) looks for to read a folder as ours. Writes are atomic: everything goes
to a temporary folder beside DST that is renamed to DST at the end, and removed on any failure.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import registry
from convert.component import (
  FORMAT_VERSION,
  HEADER_KEY,
  PARAMS_DIR,
  checkpoint_config,
  read_header,
)
from convert.safetensors_io import CheckpointError
from convert.state import check_arrays, load_into, path_str, state_paths
from svdq_jax import SVDQLinear, is_quantized

# Arrays read at once on restore. Peak RSS of restoring the 1.9 GiB benchmark checkpoint
# (benchmarks/convert_memory.py) beyond the arrays it holds, by window: 1: +0.10x, 2: +0.12x,
# 4: +0.16x, all at once (orbax's default): +0.2x to +0.3x; one at a time was not slower.
RESTORE_WINDOW = 1


def _owner() -> str:
  """`<host>-<pid>` of this process, as it appears in the names of its temporary folders."""
  return f"{re.sub(r'[^A-Za-z0-9-]', '_', socket.gethostname())}-{os.getpid()}"


def _fresh_sibling(dst: Path, kind: str) -> Path:
  """A new empty hidden folder `.<dst name>.<host>-<pid>.<random>.<kind>` beside `dst` (created
  with the usual permissions, not mkdtemp's 0700, since it becomes `dst`)."""
  folder = dst.parent / f".{dst.name}.{_owner()}.{secrets.token_hex(4)}.{kind}"
  folder.mkdir()
  return folder


_SIBLING = re.compile(r"\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)")


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def clean_stale_siblings(dst: str | os.PathLike) -> list[Path]:
  """Removes what writers of `dst` killed mid-way (SIGKILL, power loss) left beside it.

  A temporary folder of a process of this host that no longer runs is deleted. If that process
  was killed while replacing an existing `dst` (between moving the old folder aside and moving
  the new one in), the old folder is moved back first, so `dst` is again the previous one intact.
  Folders of live processes, or of other hosts, are left alone. Returns the folders removed.
  """
  dst = Path(dst).absolute()
  host = _owner().rsplit("-", 1)[0]
  prefix = f".{dst.name}"
  removed = []
  if not dst.parent.is_dir():
    return removed
  for entry in sorted(dst.parent.iterdir()):
    match = _SIBLING.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
    if match is None or match["host"] != host or _process_alive(int(match["pid"])):
      continue
    previous = entry / dst.name
    if match["kind"] == "old" and previous.exists() and not dst.exists():
      os.replace(previous, dst)
    shutil.rmtree(entry, ignore_errors=True)
    removed.append(entry)
  return removed


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields a fresh temporary folder beside `dst`; renames it to `dst` when the block succeeds.

  On any exception the temporary folder is deleted and `dst` is left as it was (absent, or the
  old folder when `overwrite`). A process killed at any moment leaves `dst` absent, complete, or
  (when replacing) moved aside beside it; the next `atomic_folder` for `dst` cleans that up first
  (`clean_stale_siblings`), so it needs no manual cleanup.

  Raises:
    CheckpointError when `dst` exists and `overwrite` is False.
  """
  dst = Path(dst).absolute()
  clean_stale_siblings(dst)
  if dst.exists() and not overwrite:
    raise CheckpointError(f"{dst}: already exists (remove it or pass overwrite=True)")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = _fresh_sibling(dst, "tmp")
  try:
    yield tmp
    if dst.exists():
      old = _fresh_sibling(dst, "old")
      os.replace(dst, old / dst.name)
      os.replace(tmp, dst)
      shutil.rmtree(old)
    else:
      os.replace(tmp, dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def _nest(flat: Mapping[str, Any]) -> dict:
  """`{"a/b": x}` -> `{"a": {"b": x}}` (orbax stores nested dicts as "a.b" entries)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def _config_dict(config: Any) -> dict:
  if isinstance(config, Mapping):
    return dict(config)
  if hasattr(config, "to_dict"):
    return config.to_dict()
  raise CheckpointError(f"config {config!r}: needs a dict or a config with to_dict()")


def write_checkpoint(arrays: Mapping[str, Any], dst: str | os.PathLike, *, model_type: str,
                     config: Any, overwrite: bool = False) -> Path:
  """Writes flat `{path: array or SVDQLinear}` as our checkpoint folder at `dst`, atomically.

  Args:
    arrays: flat parameters ("/"-joined state paths); numpy or jax arrays keep their dtype.
    dst: the folder to create.
    model_type: a registry name ("flux") or a source class name ("FluxTransformer2DModel").
    config: the model config (a dataclass with `to_dict`, or its dict).
    overwrite: replace an existing `dst`.

  Returns:
    The absolute path of the written folder.
  """
  with atomic_folder(dst, overwrite=overwrite) as tmp:
    write_into(tmp, arrays, model_type=model_type, config=config)
  return Path(dst).absolute()


@functools.cache
def _windowed(handler_class: type) -> type:
  """A subclass of an orbax TypeHandler class whose `deserialize` reads `RESTORE_WINDOW` arrays at
  a time, in order (saving is unchanged).

  orbax hands a handler all of a checkpoint's arrays in one call, and tensorstore then reads them
  all at once; each read holds its file buffer until it is copied into the returned array, so a
  full restore peaked at 1.2x to 1.3x the checkpoint size. Read in windows, the transient is the
  buffers of one window (benchmarks/convert_memory.py: about one largest tensor).
  """

  class Windowed(handler_class):
    async def deserialize(self, infos: Sequence[Any], args: Sequence[Any] | None = None
                          ) -> list[Any]:
      restored: list[Any] = []
      for start in range(0, len(infos), RESTORE_WINDOW):
        window = slice(start, start + RESTORE_WINDOW)
        restored.extend(await super().deserialize(infos[window],
                                                  None if args is None else args[window]))
      return restored

  Windowed.__name__ = Windowed.__qualname__ = f"Windowed{handler_class.__name__}"
  return Windowed


def _checkpointer() -> Any:
  """An orbax PyTree checkpointer that writes arrays as they are: no zstd (3x faster writes on
  bf16 weights, which compress by only ~20%) and no defensive deep copy of numpy arrays (which
  would double peak memory; our arrays are not mutated while being written); arrays are restored
  a window at a time (see `_windowed`)."""
  import orbax.checkpoint as ocp  # heavy, and only our format needs it
  from orbax.checkpoint import type_handlers

  handlers = type_handlers.create_type_handler_registry(
      (np.ndarray, _windowed(type_handlers.NumpyHandler)(deepcopy_host_arrays=False)),
      (np.number, type_handlers.ScalarHandler()),
      (jax.Array, _windowed(type_handlers.ArrayHandler)()))
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False,
                                                      type_handler_registry=handlers))


def write_into(folder: Path, arrays: Mapping[str, Any], *, model_type: str, config: Any) -> None:
  """Writes a checkpoint into an existing empty `folder` (no atomicity: see `write_checkpoint`)."""
  entry = registry.find_entry(model_type)
  tree: dict[str, Any] = {}
  quantized: dict[str, dict] = {}
  for path, value in arrays.items():
    if is_quantized(value):
      quantized[path] = value.metadata()
      tree[path] = value.arrays()
    else:
      tree[path] = value
  flat = _flatten(_nest(tree))
  empty = {path: {"shape": list(a.shape), "dtype": np.dtype(a.dtype).name}
           for path, a in flat.items() if a.size == 0}
  header = {"format_version": FORMAT_VERSION, "model_type": entry.name,
            "config": _config_dict(config), "quantized": quantized, "empty": empty}
  with _checkpointer() as checkpointer:
    checkpointer.save(folder / PARAMS_DIR, _nest({p: a for p, a in flat.items() if p not in empty}))
  (folder / "config.json").write_text(json.dumps({HEADER_KEY: header}, indent=2) + "\n")


def save_checkpoint(model: nnx.Module, dst: str | os.PathLike, *, model_type: str, config: Any,
                    overwrite: bool = False) -> Path:
  """Saves a model (plain or with SVDQLinear kernels) as our checkpoint folder, atomically.

  `Model.from_pretrained(dst)` and `load_checkpoint(dst)` read it back exactly.

  Args:
    model: the NNX model whose `nnx.Param`s are saved.
    dst: the folder to create (absent, or replaced when `overwrite`).
    model_type: a registry name ("flux") or source class name ("FluxTransformer2DModel").
    config: the model's config dataclass (or its `to_dict()`).
    overwrite: replace an existing `dst`.

  Returns:
    The absolute path of the written folder.
  """
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  arrays = {path_str(path): variable.get_value() for path, variable in flat}
  return write_checkpoint(arrays, dst, model_type=model_type, config=config, overwrite=overwrite)


def _host_device() -> jax.Device | None:
  """The host's CPU device, or None without a CPU backend (JAX_PLATFORMS naming only
  accelerators)."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # "Unknown backend cpu"
    return None


def _restore_args() -> Callable[[Any], Any]:
  """Maps a stored array's orbax metadata to how it is restored: a jax.Array on the host CPU
  device, in its stored dtype.

  Why jax.Arrays on the host: tensorstore returns numpy arrays in buffers of its own that are only
  16-byte aligned, and jax adopts a host buffer without a copy only when it is 64-byte aligned, so
  `load_into` copied nearly every restored numpy array (and the quantized fields, `jnp.asarray`
  in `SVDQLinear.from_arrays`) once more. Restored as jax.Arrays, each array is copied once, inside
  orbax's read window, into the buffer the model then keeps. On a GPU, `load_into` and
  `SVDQLinear.from_arrays` move each host array to the device, and it is freed. Without a CPU
  backend (JAX_PLATFORMS=cuda), or for a dtype jax would narrow (64-bit without
  jax_enable_x64), the array is restored as numpy.
  """
  import orbax.checkpoint as ocp

  device = _host_device()
  host = None if device is None else jax.sharding.SingleDeviceSharding(device)

  def args(metadata: Any) -> Any:
    dtype = np.dtype(metadata.dtype)
    if host is None or jax.dtypes.canonicalize_dtype(dtype) != dtype:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    return ocp.ArrayRestoreArgs(restore_type=jax.Array, dtype=dtype, sharding=host)

  return args


def read_arrays(path: str | os.PathLike, header: dict | None = None, *,
                quantized_device: jax.Device | None = None) -> dict[str, Any]:
  """The flat parameters of our checkpoint in their stored dtypes (host jax.Arrays, see
  `_restore_args`), and an SVDQLinear for each quantized kernel, its arrays on
  `quantized_device` (None: the default device). `header`: its `read_header`, when the caller
  has it."""
  import orbax.checkpoint as ocp

  header = read_header(path) if header is None else header
  params = Path(path).absolute() / PARAMS_DIR
  try:
    with _checkpointer() as checkpointer:
      metadata = checkpointer.metadata(params).item_metadata
      if metadata is None:
        raise CheckpointError(f"{params}: orbax metadata missing or unreadable")
      restore_args = jax.tree.map(_restore_args(), metadata.tree)
      tree = checkpointer.restore(params, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except CheckpointError:
    raise
  except Exception as e:  # orbax / tensorstore raise many types on damaged files
    raise CheckpointError(f"{params}: corrupt or incomplete orbax parameters: "
                          f"{type(e).__name__}: {e}") from e
  arrays = _flatten(tree)
  for name, spec in header.get("empty", {}).items():
    arrays[name] = np.zeros(spec["shape"], jnp.dtype(spec["dtype"]))
  for layer, layer_metadata in header.get("quantized", {}).items():
    prefix = layer + "/"
    # As numpy views (no copy): the layer's jnp.asarray then puts them on the default device,
    # uncommitted, like every other parameter (a host jax.Array would stay on the CPU).
    fields = {k[len(prefix):]: np.asarray(arrays.pop(k))
              for k in [k for k in arrays if k.startswith(prefix)]}
    if not fields:
      raise CheckpointError(f"{path}: quantized layer {layer!r} has no arrays in {params}")
    try:
      arrays[layer] = SVDQLinear.from_arrays(fields, layer_metadata, device=quantized_device)
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{path}: quantized layer {layer!r}: {e}") from e
  return arrays


def load_checkpoint(path: str | os.PathLike, dtype: jnp.dtype | None = None,
                    shardings: Callable[[str, tuple[int, ...]], Any] | None = None
                    ) -> nnx.Module:
  """Builds the model a checkpoint of ours holds and fills it with the stored parameters.

  Args:
    path: our checkpoint folder (see the module docstring).
    dtype: compute dtype of the model, and the dtype floating parameters are cast to; None keeps
      the stored dtypes. Quantized kernels are never cast.
    shardings: places each parameter as it is set (`convert.state.load_into`); None: the
      default device. The quantized layers are then read onto the host CPU device first (where
      there is a CPU backend), so they too reach the accelerators only as their shards.

  Returns:
    The model, of the class the checkpoint's model_type names.
  """
  header = read_header(path)
  component = checkpoint_config(path, header)
  model = component.entry.abstract_model(component.config, dtype=dtype)
  arrays = read_arrays(path, header,
                      quantized_device=None if shardings is None else _host_device())
  return load_into(model, arrays, source=str(path), dtype=dtype, keep_stored_dtype=True,
                   consume=True, shardings=shardings)


def check_against_model(arrays: Mapping[str, Any], entry: registry.ModelEntry, config: Any, *,
                        source: str) -> None:
  """Raises CheckpointError unless `arrays` fit the model `entry` builds from `config` (keys,
  shapes, kind of dtype); builds the model under `nnx.eval_shape`, so nothing is allocated."""
  check_arrays(state_paths(entry.abstract_model(config)), arrays, source=source)
