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
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping
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


def _quantize_kernel(kernel: Any, path: str, layer: QuantConfig,
                     stats: Mapping[str, ActivationStats] | None) -> SVDQLinear:
  """quantize_linear of one kernel (K, N) with the statistics recorded at `path`; the input shift
  from `layer.shifted` when it is set (INT4 activations)."""
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
    return quantize_linear(kernel, None, None, layer, act_shift=shift, name=path)
  return quantize_linear(kernel, None, jnp.asarray(layer_stats.samples), layer,
                         act_absmax=jnp.asarray(layer_stats.absmax),
                         act_max=jnp.asarray(layer_stats.maximum),
                         act_min=float(np.min(layer_stats.minimum)), act_shift=shift, name=path)


def _quantize_fused(paths: tuple[str, ...], kernels: list[Any], layer: QuantConfig,
                    stats: Mapping[str, ActivationStats] | None) -> dict[str, SVDQLinear]:
  """One fused group: the kernels concatenated along N quantized as one layer (calibrated on the
  first linear's inputs, which all of them read), split back per linear."""
  fused = _quantize_kernel(jnp.concatenate([jnp.asarray(k) for k in kernels], axis=1), paths[0],
                           layer, stats)
  parts = split_outputs(fused, tuple(int(k.shape[1]) for k in kernels))
  return dict(zip(paths, parts, strict=True))


def quantize_params(params: Any, stats: Mapping[str, ActivationStats] | None,
                    config: QuantConfig, *, progress: bool = True) -> Any:
  """Replaces every selected dense kernel with an SVDQLinear; a pure function.

  Args:
    params: an nnx.State (e.g. `nnx.state(model)`) or a nested dict of arrays. Leaves may be
      jax.ShapeDtypeStruct (then the result holds abstract SVDQLinears, for memory accounting).
    stats: `calibrate`'s output keyed by kernel path, or None for data-free quantization (only
      configs without smoothing and GPTQ).
    config: the model-wide QuantConfig. weight_format None (the "bf16" preset) casts the selected
      kernels to bfloat16 instead.
    progress: show a tqdm bar over the layers.

  Returns:
    The same structure with the selected kernels replaced; the input is not modified. Kernels of
    a `config.fused` group (`fused_units`) are quantized as one layer and split back.
  """
  selected, unfit = _selection(params, config)
  units = fused_units(params, config)
  kernels = {path: leaf for path, leaf in named_leaves(params) if path in units}
  fused_done: dict[str, SVDQLinear] = {}
  if unfit:
    path, (k, group) = next(iter(unfit.items()))
    logger.warning("quantize: %d linear layer(s) stay 16-bit because their in_features are not a "
                   "multiple of the group size (e.g. %r: %d inputs, group %d)", len(unfit), path,
                   k, group)
  bar = tqdm(total=len(selected), desc="quantize", disable=not progress, leave=False)

  def replace(path: str, leaf: Any) -> Any:
    layer = selected.get(path)
    if layer is None:
      return leaf
    bar.set_postfix_str(path, refresh=False)
    bar.update()
    if layer.weight_format is None:
      if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16)
      return leaf.astype(jnp.bfloat16)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return abstract_svdq_linear(leaf, layer)
    unit = units.get(path)
    if unit is None:
      return _quantize_kernel(leaf, path, layer, stats)
    if path not in fused_done:
      fused_done.update(_quantize_fused(unit, [kernels[p] for p in unit], layer, stats))
    return fused_done.pop(path)

  try:
    return map_named_leaves(replace, params)
  finally:
    bar.close()


def quantize_model(model: nnx.Module, stats: Mapping[str, ActivationStats] | None,
                   config: QuantConfig, *, progress: bool = True) -> nnx.Module:
  """Quantizes an NNX model in place (`nnx.update` with `quantize_params`' result); returns it."""
  nnx.update(model, quantize_params(nnx.state(model), stats, config, progress=progress))
  return model
