"""Data-parallel sampling over several devices with the mesh API (not `jax.pmap`).

The batch (prompts, latents, keys) is split along a one-dimensional `jax.make_mesh` axis named
"data" with `NamedSharding`; weights are replicated. The per-device function runs under
`jax.shard_map`, so every device sees an ordinary local batch and any Pallas call inside it needs
no sharding rule of its own. `data_parallel(fn, devices=n)` is the `pmap`-style one-liner.

Multi-host (not run here): call `jax.distributed.initialize()` first on every host (coordinator
address, process count and id, or read from the cluster environment); `jax.devices()` then lists
the devices of all hosts and `data_mesh()` spans them. Each host builds the global batch from its
own rows with `jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)` and every
host calls the same jitted shard_map function; `data_parallel` itself puts host arrays with
`jax.device_put`, which is the single-process path. Results are global arrays; a host reads its
rows from `addressable_shards`. Only single-host runs were tested: CPU with 8 virtual devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
                  in_axes: Sequence[int | None] | int | None = 0) -> Callable[..., Any]:
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
  """
  mesh = data_mesh(devices)
  count = mesh.devices.size

  @functools.cache
  def compiled(axes: tuple[int | None, ...]):
    specs = tuple(P(DATA_AXIS) if a == 0 else P() for a in axes)
    local = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(DATA_AXIS),
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
    placed = [shard_batch(next(it), mesh) if ax == 0 else replicate(arg, mesh)
              for arg, ax in zip(args, axes, strict=True)]
    out = compiled(axes)(*placed)
    if size % count == 0:  # no padding to cut (and no slice that would gather the shards)
      return out
    return jax.tree.map(lambda x: x[:size], out)

  run.mesh = mesh
  return run
