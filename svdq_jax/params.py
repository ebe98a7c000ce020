"""`quantize_params` / `quantize_model`: SVDQuant over every selected linear of a model.

A kernel is selected when its path ends in "kernel", it is a 2-D float array and no `skip` pattern
matches its path (fnmatch, `*` also matches "/", the whole path must match). Kernels matching a
`weight_only` pattern become INT4 g64 W4A16 (no smoothing, no low-rank branch), the rest get the
config as given. The layer's own `bias` stays where it is: the SVDQLinear's bias only holds the
correction it needs (the shift compensation). A kernel whose in_features are not a multiple of its
group size (e.g. a width-32 test model under a g64 preset) stays 16-bit, and `quantize_params`
logs one notice per call counting such layers (zero-padding K, as Nunchaku does, would change the
SVDQLinear layout). Sibling linears named by a `QuantConfig.fused` group (q/k/v) are quantized as
one concatenated layer and split back, so they share the smoothing factor and `lora_down`.
The layers are spread over the local devices (`devices`), each result sent back to its kernel's
device; the result does not depend on how many devices ran it.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import fnmatch
import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax import quantizers as qz
from svdq_jax.calibration import ActivationStats
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError
from svdq_jax.qlinear import SVDQLinear, expected_shapes, split_outputs
from svdq_jax.transform import quantize_linear
from svdq_jax.tree import map_named_leaves, named_leaves

logger = logging.getLogger("svdq_jax")


def matches_any(path: str, patterns: tuple[str, ...]) -> bool:
  """True when a fnmatch pattern (`*` also matches "/") matches the whole path."""
  return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _is_linear_kernel(path: str, leaf: Any) -> bool:
  return (path.rsplit("/", 1)[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def layer_config(path: str, config: QuantConfig) -> QuantConfig | None:
  """The config the kernel at `path` is quantized with, or None when it stays as it is."""
  if matches_any(path, config.skip):
    return None
  if config.weight_format is not None and matches_any(path, config.weight_only):
    return dataclasses.replace(config, weight_format="int4", act_format=None, group_size=64,
                               rank=0, smooth=None, svd_iters=0, residual="rtn",
                               shift_activations=False)
  return config


def abstract_svdq_linear(kernel: jax.ShapeDtypeStruct, config: QuantConfig, *,
                         shifted: bool = False) -> SVDQLinear:
  """An SVDQLinear of ShapeDtypeStructs for a kernel shape (memory accounting, eval_shape)."""
  k, n = kernel.shape
  fmt = config.layer_format(k, qz.GELU_SHIFT if shifted else 0.0)
  shapes = expected_shapes(fmt, k, n, config.rank, has_bias=shifted)
  shapes.setdefault("bias", None)
  return SVDQLinear(**shapes, format=fmt, in_features=k, out_features=n)


def fits_group(in_features: int, config: QuantConfig) -> bool:
  """Whether a layer with `in_features` inputs can be quantized with `config` (K a multiple of
  the group size and even); always True for weight_format None (a cast to bfloat16)."""
  if config.weight_format is None:
    return True
  group = config.effective_group(in_features)
  return in_features % group == 0 and in_features % 2 == 0


def _selection(params: Any, config: QuantConfig
               ) -> tuple[dict[str, QuantConfig], dict[str, tuple[int, int]]]:
  """({path: config} of the kernels to replace, {path: (in_features, group size)} of those whose
  in_features do not fit their group, which stay as they are)."""
  selected, unfit = {}, {}
  for path, leaf in named_leaves(params):
    if _is_linear_kernel(path, leaf):
      layer = layer_config(path, config)
      if layer is not None:
        k = leaf.shape[0]
        if fits_group(k, layer):
          selected[path] = layer
        else:
          unfit[path] = (k, layer.effective_group(k))
  return selected, unfit


def selected_kernels(params: Any, config: QuantConfig) -> dict[str, QuantConfig]:
  """{kernel path: the layer's config} for every kernel `quantize_params` would replace (not the
  ones whose in_features are not a multiple of their group size: those stay 16-bit)."""
  return _selection(params, config)[0]


def fused_units(params: Any, config: QuantConfig) -> dict[str, tuple[str, ...]]:
  """{kernel path: the kernel paths of its `config.fused` group, in group order} for every kernel
  `quantize_params` quantizes jointly with its siblings; kernels quantized alone are absent.

  A group applies under a parent when all its linears are selected, with the same layer config
  and the same in_features (else each is quantized on its own).
  """
  if not config.fused:
    return {}
  selected = selected_kernels(params, config)
  shapes = {path: tuple(leaf.shape) for path, leaf in named_leaves(params) if path in selected}
  units: dict[str, tuple[str, ...]] = {}
  for path, layer in selected.items():
    parent, _, name = path[: -len("/kernel")].rpartition("/")
    prefix = f"{parent}/" if parent else ""
    for group in config.fused:
      if name != group[0]:
        continue
      paths = tuple(f"{prefix}{member}/kernel" for member in group)
      if all(selected.get(p) == layer and shapes[p][0] == shapes[path][0] for p in paths):
        units.update((p, paths) for p in paths)
  return units


def quantize_devices(devices: Sequence[jax.Device] | int | None = None) -> list[jax.Device]:
  """The devices `quantize_params` spreads its layers over: None for every local device of the
  default backend (`jax.local_devices()`; on the CPU backend only the first, since its virtual
  devices share the same cores and each one would compile the transform again), a count for the
  first that many, or the devices given.

  Raises:
    InputError for a count below 1 or above the local device count, or an empty sequence.
  """
  available = jax.local_devices()
  if devices is None:
    return available[:1] if available[0].platform == "cpu" else available
  if isinstance(devices, int):
    if not 1 <= devices <= len(available):
      raise InputError(f"quantize: asked for {devices} devices, but there are {len(available)} "
                       f"{available[0].platform} device(s): ask for 1 to {len(available)}")
    return available[:devices]
  chosen = list(devices)
  if not chosen:
    raise InputError("quantize: devices is empty; give at least one device (or None for all)")
  return chosen


def _quantize_kernel(kernel: Any, path: str, layer: QuantConfig,
                     stats: Mapping[str, ActivationStats] | None,
                     device: jax.Device | None = None) -> SVDQLinear:
  """quantize_linear of one kernel (K, N) with the statistics recorded at `path`; the input shift
  from `layer.shifted` when it is set (INT4 activations). With a `device` the kernel and the
  statistics are put there first, so the transform runs (asynchronously) on it."""
  def put(x: Any) -> Any:
    return x if device is None else jax.device_put(x, device)

  shift = None
  if layer.shifted is not None and layer.act_format == "int4":
    shift = qz.GELU_SHIFT if matches_any(path, layer.shifted) else 0.0
  layer_stats = None if stats is None else stats.get(path)
  if layer_stats is None and (stats is not None and layer.quantizes_activations
                              or layer.needs_calibration_data):
    raise InputError(f"quantize_params: layer {path!r} has no calibration statistics "
                     f"(stats has {len(stats or {})} layers); calibrate with the same model "
                     "or add the layer to config.skip")
  if layer_stats is None:
    return quantize_linear(put(kernel), None, None, layer, act_shift=shift, name=path)
  return quantize_linear(put(kernel), None, put(layer_stats.samples), layer,
                         act_absmax=put(layer_stats.absmax), act_max=put(layer_stats.maximum),
                         act_min=float(np.min(layer_stats.minimum)), act_shift=shift, name=path)


def _home(kernel: Any, devices: list[jax.Device]) -> jax.Device:
  """Where a layer's result goes: the kernel's device (the first of `devices` for host arrays
  and kernels spread over several devices), as a one-device run leaves it."""
  placed = kernel.devices() if isinstance(kernel, jax.Array) else ()
  return next(iter(placed)) if len(placed) == 1 else devices[0]


def _quantize_unit(paths: tuple[str, ...], kernels: list[Any], layer: QuantConfig,
                   stats: Mapping[str, ActivationStats] | None, device: jax.Device,
                   home: jax.Device) -> dict[str, SVDQLinear]:
  """One layer, or one fused group (the kernels concatenated along N, quantized as one layer
  calibrated on the first linear's inputs, which all of them read, split back per linear), run
  on `device`; the results are sent to `home` (asynchronously)."""
  kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(
      [jnp.asarray(k) for k in kernels], axis=1)
  quantized = _quantize_kernel(kernel, paths[0], layer, stats, device)
  if device != home:
    quantized = jax.device_put(quantized, home)
  if len(paths) == 1:
    return {paths[0]: quantized}
  parts = split_outputs(quantized, tuple(int(k.shape[1]) for k in kernels))
  return dict(zip(paths, parts, strict=True))


def quantize_params(params: Any, stats: Mapping[str, ActivationStats] | None,
                    config: QuantConfig, *, progress: bool = True,
                    devices: Sequence[jax.Device] | int | None = None) -> Any:
  """Replaces every selected dense kernel with an SVDQLinear; a pure function.

  Args:
    params: an nnx.State (e.g. `nnx.state(model)`) or a nested dict of arrays. Leaves may be
      jax.ShapeDtypeStruct (then the result holds abstract SVDQLinears, for memory accounting).
    stats: `calibrate`'s output keyed by kernel path, or None for data-free quantization (only
      configs without smoothing and GPTQ).
    config: the model-wide QuantConfig. weight_format None (the "bf16" preset) casts the selected
      kernels to bfloat16 instead.
    progress: show a tqdm bar over the layers (it advances as layers finish, in order).
    devices: the devices the layers are quantized on (`quantize_devices`: None for every local
      device). Each layer (or fused group) goes, with its statistics, to the device with the least
      K * N assigned so far; with several devices one worker thread per device dispatches them
      (at most twice the device count in flight, so they run concurrently; thread-local jax
      settings such as a `jax.default_matmul_precision` context do not reach the workers, set
      them with `jax.config.update`) and every result is sent back to its kernel's device. The
      transform depends only on the layer (its RNG keys come from `config.seed`), so the result
      is the same, bit for bit, on any number of devices of one kind.

  Returns:
    The same structure with the selected kernels replaced; the input is not modified. Kernels of
    a `config.fused` group (`fused_units`) are quantized as one layer and split back.
  """
  selected, unfit = _selection(params, config)
  units = fused_units(params, config)
  if unfit:
    path, (k, group) = next(iter(unfit.items()))
    logger.warning("quantize: %d linear layer(s) stay 16-bit because their in_features are not a "
                   "multiple of the group size (e.g. %r: %d inputs, group %d)", len(unfit), path,
                   k, group)
  kernels = {path: leaf for path, leaf in named_leaves(params) if path in selected}
  done: dict[str, Any] = {}
  jobs: list[tuple[str, ...]] = []
  for path, leaf in kernels.items():
    layer = selected[path]
    if layer.weight_format is None:
      done[path] = (jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16)
                    if isinstance(leaf, jax.ShapeDtypeStruct) else leaf.astype(jnp.bfloat16))
    elif isinstance(leaf, jax.ShapeDtypeStruct):
      done[path] = abstract_svdq_linear(leaf, layer)
    elif path not in units or units[path][0] == path:
      jobs.append(units.get(path, (path,)))
  bar = tqdm(total=len(selected), desc="quantize", disable=not progress, leave=False)
  try:
    bar.update(len(done))
    if jobs:
      _run_jobs(jobs, kernels, selected, stats, quantize_devices(devices), done, bar)
  finally:
    bar.close()
  return map_named_leaves(lambda path, leaf: done[path] if path in done else leaf, params)


def _run_jobs(jobs: list[tuple[str, ...]], kernels: dict[str, Any],
              selected: dict[str, QuantConfig], stats: Mapping[str, ActivationStats] | None,
              devices: list[jax.Device], done: dict[str, Any], bar: Any) -> None:
  """Quantizes the layers (or fused groups) `jobs` over `devices` into `done`.

  Each job goes to the least loaded device (by K * N). With one device they run in order here;
  with several, one worker thread per device dispatches its jobs (so the host-side work of a
  layer, its compilation included, overlaps the others' device work), at most 2 * len(devices)
  in flight, and they are collected (waited for) in order here, which advances the bar.
  """
  load = [0] * len(devices)
  calls: list[tuple[tuple[str, ...], int, functools.partial]] = []
  for paths in jobs:
    unit = [kernels[p] for p in paths]
    index = min(range(len(devices)), key=load.__getitem__)
    load[index] += int(unit[0].shape[0]) * sum(int(k.shape[1]) for k in unit)
    calls.append((paths, index, functools.partial(
        _quantize_unit, paths, unit, selected[paths[0]], stats, devices[index],
        _home(unit[0], devices))))
  if len(devices) == 1:
    for paths, _, call in calls:
      bar.set_postfix_str(paths[0], refresh=False)
      done.update(call())
      bar.update(len(paths))
    return
  workers = [futures.ThreadPoolExecutor(1, thread_name_prefix=f"svdq-quantize-{i}")
             for i in range(len(devices))]
  pending: collections.deque = collections.deque()

  def collect() -> None:
    paths, future = pending.popleft()
    done.update(jax.block_until_ready(future.result()))
    bar.set_postfix_str(paths[0], refresh=False)
    bar.update(len(paths))

  try:
    for paths, index, call in calls:
      logger.debug("quantize: %s on %s", paths[0], devices[index])
      pending.append((paths, workers[index].submit(contextvars.copy_context().run, call)))
      if len(pending) >= 2 * len(devices):
        collect()
    while pending:
      collect()
  finally:
    for worker in workers:
      worker.shutdown(wait=True, cancel_futures=True)


def quantize_model(model: nnx.Module, stats: Mapping[str, ActivationStats] | None,
                   config: QuantConfig, *, progress: bool = True,
                   devices: Sequence[jax.Device] | int | None = None) -> nnx.Module:
  """Quantizes an NNX model in place (`nnx.update` with `quantize_params`' result, its layers
  spread over `devices`, every local device by default); returns it."""
  nnx.update(model, quantize_params(nnx.state(model), stats, config, progress=progress,
                                    devices=devices))
  return model
