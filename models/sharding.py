"""Sampling over several devices with the mesh API (not `jax.pmap`): data parallel, and
parameters sharded over the devices.

The batch (prompts, latents, keys) is split along a one-dimensional `jax.make_mesh` axis named
"data" with `NamedSharding`; weights are replicated. The per-device function runs under
`jax.shard_map`, so every device sees an ordinary local batch and any Pallas call inside it needs
no sharding rule of its own. `data_parallel(fn, devices=n)` is the `pmap`-style one-liner.

Several processes (JAX's multi-controller runtime, `pipelines.distributed.initialize` first):
`jax.devices()` then lists the devices of every process and `data_mesh()` spans them. Every
process calls the same functions with the same host values (the whole batch: token ids and noise
are cheap); `jax.device_put` onto a sharding of the global mesh puts on this process's devices only
the rows they own, so each process feeds its rows of the global batch. Results are global arrays:
`process_rows` says which rows a process owns, `local_rows` reads them from its addressable shards
without any communication, and `to_host` gathers a whole array on every process (a cross-process
all-gather; on CPU through jax's gloo collectives).

Sharded weights (`weight_shardings`): every parameter array, the quantized `SVDQLinear` arrays
included, split over the same "data" axis, FSDP-style (each array along its largest axis the
device count divides) or by output channels; the sampling function is then an ordinary `jax.jit`
whose partitioner gathers what each layer needs (no `shard_map`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from svdq_jax.errors import InputError

DATA_AXIS = "data"


def check_device_count(count: int) -> None:
  """Raises InputError unless 1 <= `count` <= the number of devices `jax.devices()` lists.

  The rule of `data_mesh`, for callers that check a user's device count before any work.
  """
  available = jax.devices()
  if not 1 <= count <= len(available):
    raise InputError(f"asked for {count} devices, but there are {len(available)} "
                     f"{available[0].platform} device(s): ask for 1 to {len(available)}")


def sampling_device_count(devices: int | None) -> int:
  """The devices a sampling call runs over: `devices` (None: one) in one process; with several
  processes every device of every process (`devices` must then be None or that count).

  Raises:
    InputError for a count `check_device_count` refuses, or one that is not every device of a
    multi-process run.
  """
  if jax.process_count() > 1:
    total = jax.device_count()
    if devices not in (None, total):
      raise InputError(f"with {jax.process_count()} processes sampling runs over all {total} "
                       f"devices of all processes; asked for {devices}")
    return total
  count = devices or 1
  check_device_count(count)
  return count


def data_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh ("data",) over the first `devices` devices (default: all of them).

  Raises:
    InputError when a count below 1, or more devices than exist, are asked for.
  """
  available = jax.devices()
  if devices is None:
    chosen = available
  elif isinstance(devices, int):
    check_device_count(devices)
    chosen = available[:devices]
  else:
    chosen = list(devices)
  # Auto axis: shardings stay out of the array types, so host-side slicing and padding of
  # sharded results work as on one device.
  return jax.make_mesh((len(chosen),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,),
                       devices=chosen)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (weights)."""
  return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of `tree` on the mesh, split along its leading axis."""
  return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of `tree` whole on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
  """Pads the leading axis of every leaf to a multiple of `multiple` by repeating the last item.

  Returns (padded tree, original batch size). All leaves must share the leading size.
  """
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"pad_batch: leaves disagree on the batch size: {sorted(sizes)}")
  (size,) = sizes
  extra = -size % multiple
  if extra == 0:
    return tree, size
  def pad(leaf):
    tail = jnp.repeat(leaf[-1:], extra, axis=0)
    return jnp.concatenate([leaf, tail], axis=0)
  return jax.tree.map(pad, tree), size


def data_parallel(fn: Callable[..., Any], *, devices: int | Sequence[jax.Device] | None = None,
                  in_axes: Sequence[int | None] | int | None = 0, trim: bool = True
                  ) -> Callable[..., Any]:
  """`pmap`-style: `data_parallel(fn, devices=8)(weights, batch)` over a mesh "data" axis.

  fn maps a local batch to outputs whose leading axis is that batch. Arguments with in_axes 0 are
  split along their leading axis (padded to a multiple of the device count, and the padding cut
  from the outputs); arguments with in_axes None (weights, schedules) are replicated. Outputs
  come back sharded along "data". Unlike `jax.pmap` the batch need not divide the device count,
  and outputs are ordinary global arrays.

  Args:
    fn: pure function of positional arguments (pytrees of arrays).
    devices: device count or devices (default: all).
    in_axes: one entry per positional argument (0 or None), or one value for all.
    trim: cut the padding from the outputs (a cut array is no longer split along "data"); False
      keeps the padded batch, split as computed, for `local_rows`.
  """
  mesh = data_mesh(devices)
  count = mesh.devices.size

  def with_empties(*args):
    return fn(*_fill_empty(args))

  @functools.cache
  def compiled(axes: tuple[int | None, ...]):
    specs = tuple(P(DATA_AXIS) if a == 0 else P() for a in axes)
    local = jax.shard_map(with_empties, mesh=mesh, in_specs=specs, out_specs=P(DATA_AXIS),
                          check_vma=False)
    return jax.jit(local)

  def run(*args):
    axes = tuple(in_axes) if isinstance(in_axes, Sequence) else (in_axes,) * len(args)
    if len(axes) != len(args):
      raise ValueError(f"data_parallel: {len(args)} arguments but {len(axes)} in_axes")
    if any(a not in (0, None) for a in axes):
      raise ValueError(f"data_parallel: in_axes must be 0 or None, got {axes}")
    batched = [a for a, ax in zip(args, axes, strict=True) if ax == 0]
    if not batched:
      raise ValueError("data_parallel: no argument has in_axes 0 (nothing to split)")
    padded, size = pad_batch(tuple(batched), count)
    it = iter(padded)
    placed = [shard_batch(next(it), mesh) if ax == 0 else replicate(_strip_empty(arg), mesh)
              for arg, ax in zip(args, axes, strict=True)]
    out = compiled(axes)(*placed)
    if not trim or size % count == 0:  # nothing to cut (and no slice that gathers the shards)
      return out
    return jax.tree.map(lambda x: x[:size], out)

  run.mesh = mesh
  return run


@jax.tree_util.register_static
class _Empty:
  """Stands for a zero-size array (its shape and dtype) in a `data_parallel` argument: a pytree
  node without leaves, so the array never becomes an input of the `shard_map`."""

  def __init__(self, shape: tuple[int, ...], dtype: Any):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Empty) and (self.shape, self.dtype) == (other.shape, other.dtype)

  def __hash__(self) -> int:
    return hash((self.shape, self.dtype))


# Workaround for an XLA bug (jax/jaxlib 0.11.2, seen on CPU): a zero-size array that enters a
# jitted `jax.shard_map` as an input and is used inside it (an SVDQLinear of low-rank 0: lora_down
# (K, 0), lora_up (0, N)) segfaults the compiler in Shardy's canonicalization
# (`ManualComputationUnusedInputsPattern::matchAndRewrite`). `data_parallel` therefore passes each
# zero-size leaf of a replicated argument as an `_Empty` marker and builds the (empty) array inside
# the per-device function, where it is an ordinary constant.
def _strip_empty(tree: Any) -> Any:
  """`tree` with every zero-size array leaf replaced by its `_Empty` marker."""
  return jax.tree.map(lambda x: _Empty(x.shape, x.dtype) if getattr(x, "size", 1) == 0 else x,
                      tree)


def _fill_empty(tree: Any) -> Any:
  """Undoes `_strip_empty`: every `_Empty` marker becomes zeros of its shape and dtype."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, _Empty) else x,
                      tree, is_leaf=lambda x: isinstance(x, _Empty))


def process_rows(batch: int, mesh: Mesh) -> list[int]:
  """The rows of a `batch` that this process's devices compute under `data_parallel` on `mesh`
  (the batch padded to a multiple of the mesh size; padding rows left out), in order."""
  count = mesh.devices.size
  padded = batch + (-batch % count)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((padded,))
  rows = {row for index in index_map.values() for row in range(padded)[index[0]]}
  return sorted(row for row in rows if row < batch)


def local_rows(x: jax.Array, batch: int) -> np.ndarray:
  """This process's rows (`process_rows` order, below `batch`) of a global array `x` split along
  its leading axis, read from its addressable shards (no communication)."""
  rows = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    for offset, row in enumerate(np.asarray(shard.data)):
      rows.setdefault(start + offset, row)
  kept = sorted(r for r in rows if r < batch)
  return np.stack([rows[r] for r in kept]) if kept else np.zeros((0, *x.shape[1:]), x.dtype)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of `x` as a numpy array on this process; an array spread over several processes is
  all-gathered (every process must call this)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


WEIGHT_SHARDINGS = ("fsdp", "channels")

# Axis of the output channels of each parameter a layer holds, by the leaf's name: plain kernels
# (K, N), SVDQLinear's arrays (docs/format.md) and biases. Names not listed are split only
# FSDP-style (or kept whole under "channels").
_CHANNEL_AXIS = {"kernel": -1, "qweight": 0, "wscales": 1, "lora_up": 1, "bias": 0,
                 "wcscales": 0}


def _split_axis(name: str, shape: tuple[int, ...], count: int, mode: str) -> int | None:
  if mode == "channels":
    axis = _CHANNEL_AXIS.get(name)
    if axis is None or not shape or shape[axis] % count:
      return None
    return axis % len(shape)
  axes = [a for a in range(len(shape)) if shape[a] % count == 0 and shape[a] >= count]
  return max(axes, key=lambda a: (shape[a], -a)) if axes else None


def weight_shardings(state: Any, mesh: Mesh, mode: str) -> Any:
  """A pytree of `NamedSharding`s, one per array leaf of `state` (parameters, `SVDQLinear`s
  included), that splits it over the mesh's "data" axis.

  mode: "fsdp" splits each array along its largest axis that the device count divides (the
    partitioner gathers each layer's weights where it is used); "channels" splits the output
    channels of every linear (kernel (K, N) along N; SVDQLinear qweight (N, K/2), wscales (K/g, N),
    lora_up (r, N), bias and wcscales (N,)), so each device computes its channels. Arrays that
    cannot be split (scalars, sizes the count does not divide, lora_down and smooth under
    "channels") are replicated.

  Raises:
    InputError for an unknown mode.
  """
  _check_mode(mode)

  def leaf_sharding(path, leaf) -> NamedSharding:
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    names = [str(n) for n in names if n is not None and str(n) != "value"]
    return param_sharding(names[-1] if names else "", tuple(leaf.shape), mesh, mode)

  return jax.tree_util.tree_map_with_path(leaf_sharding, state)


def param_sharding(name: str, shape: tuple[int, ...], mesh: Mesh, mode: str) -> NamedSharding:
  """The sharding `weight_shardings` gives one parameter: `name` is its leaf's name ("kernel",
  "qweight", "bias", ...), `shape` its shape. For loaders that place each array as they read it.

  Raises:
    InputError for an unknown mode.
  """
  _check_mode(mode)
  axis = _split_axis(name, tuple(shape), mesh.devices.size, mode)
  if axis is None:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def _check_mode(mode: str) -> None:
  if mode not in WEIGHT_SHARDINGS:
    raise InputError(f"unknown weight sharding {mode!r}: expected one of {WEIGHT_SHARDINGS}")


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes each device holds of the arrays of `tree`, summed from their `addressable_shards`
  (abstract arrays with a `.sharding` count by their shard shape on every device)."""
  totals: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    else:
      shard_shape = leaf.sharding.shard_shape(leaf.shape)
      nbytes = int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
      for device in leaf.sharding.device_set:
        totals[device] = totals.get(device, 0) + nbytes
  return totals
