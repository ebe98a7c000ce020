"""`svdq_dot`: the one entry point every model linear layer calls, and its dispatch.

It accepts a plain kernel (K, N) or an `SVDQLinear`, so model code never branches on quantization.
For an `SVDQLinear` the implementation is, in order of precedence, the `impl` argument, the
innermost `use_impl` context, or "auto". Like tokamax's ops, "auto" tries the implementations
from the most specialised to the one that runs everywhere (`AUTO_ORDER`: the fused Pallas kernels,
then the XLA reference) and takes the first that supports the case; a single named implementation
that cannot serve the case raises an InputError saying why instead of falling back.
The choice is made at trace time: a function jitted under one implementation keeps it.

While `calibrate` runs, `svdq_dot` also reports each call's activations to the active recorder (a
context variable read at trace time only: no cost under `jax.jit`).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp

import pallas_kernels.svdq_linear as kernels
from svdq_jax import calibration
from svdq_jax.errors import InputError
from svdq_jax.qlinear import SVDQLinear, xla_dot

Impl = Literal["auto", "xla", "pallas", "pallas-interpret"]
IMPLS: tuple[str, ...] = ("auto", "xla", "pallas", "pallas-interpret")
"""The implementations: "xla" (the reference, any backend), "pallas" (the fused Mosaic GPU
kernels, Hopper only), "pallas-interpret" (the same kernels in the Mosaic GPU interpreter, for CPU
tests) and "auto"."""
AUTO_ORDER: tuple[str, ...] = ("pallas", "xla")
"""What "auto" tries, most specialised first; "xla" supports every case."""

_IMPL: contextvars.ContextVar[str | None] = contextvars.ContextVar("svdq_jax_impl", default=None)
_NOTICES: set[str] = set()


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise InputError(f"svdq_dot: impl {impl!r} is not one of {', '.join(map(repr, IMPLS))}")


@contextlib.contextmanager
def use_impl(impl: Impl) -> Iterator[None]:
  """Within the block, `svdq_dot` calls without an `impl` argument use `impl` (per thread and
  per asyncio task; read when a function is traced, so jit inside the block).

      with svdq_jax.use_impl("xla"):
        y = model(x)
  """
  _check_impl(impl)
  token = _IMPL.set(impl)
  try:
    yield
  finally:
    _IMPL.reset(token)


def current_impl() -> Impl:
  """The implementation `svdq_dot(impl=None)` uses here: the innermost `use_impl`, else "auto"."""
  return _IMPL.get() or "auto"


def svdq_dot(
    x: jax.Array,
    w: Any,
    *,
    bias: jax.Array | None = None,
    impl: Impl | None = None,
) -> jax.Array:
  """Computes `x @ w + bias` for a plain kernel or an `SVDQLinear`.

  Args:
    x: activations (..., K), any float dtype; any leading batch shape.
    w: a plain kernel (K, N) or an `SVDQLinear`.
    bias: the layer's own bias (N,) or None. For an `SVDQLinear` its folded `w.bias` is added too.
    impl: one of `IMPLS`, or None for `current_impl()` (see the module docstring). A plain kernel
      is always a jnp.matmul.

  Returns:
    (..., N) in x's dtype.

  Raises:
    InputError for an unknown `impl`, or a Pallas `impl` that cannot compute this layer.
  """
  recorder = calibration.active_recorder()
  if recorder is not None:
    recorder.record(w, x)
  if impl is not None:
    _check_impl(impl)
  if isinstance(w, SVDQLinear):
    return _quantized_dot(x, w, bias, impl or current_impl())
  if not hasattr(w, "shape") or len(w.shape) != 2:
    raise ValueError(f"svdq_dot: w must be a 2-D kernel (K, N) or an SVDQLinear, got "
                     f"{type(w).__name__} with shape {getattr(w, 'shape', None)}")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"svdq_dot: x has {x.shape[-1]} input features, kernel expects {w.shape[0]}")
  y = jnp.matmul(x, w.astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def _quantized_dot(x: jax.Array, w: SVDQLinear, bias: jax.Array | None, impl: str) -> jax.Array:
  if x.shape[-1] != w.in_features:
    raise ValueError(f"svdq_dot: x has {x.shape[-1]} input features, the quantized layer "
                     f"expects {w.in_features}")
  if impl == "auto":
    impl = _auto_impl(x, w)
  elif impl != "xla":
    reason = pallas_unsupported_reason(x, w, interpret=impl == "pallas-interpret")
    if reason is not None:
      raise InputError(f"svdq_dot: impl={impl!r} cannot compute this layer: {reason}; use "
                       "impl='xla' or 'auto'")
  if impl == "xla":
    return xla_dot(x, w, bias)
  return _pallas_dot(x, w, bias, interpret=impl == "pallas-interpret")


def pallas_unsupported_reason(x: jax.Array, w: SVDQLinear, *, interpret: bool = False
                              ) -> str | None:
  """Why the fused kernels cannot compute `x @ w` (the format, the shapes, the device), or None.
  `interpret` skips the device check (the interpreter runs anywhere)."""
  if w.weight_format != "int4" or w.act_format != "int4":
    return (f"the Pallas kernels support INT4 W4A4 only, this layer is weight {w.weight_format} "
            f"/ activations {w.act_format}")
  if w.wcscales is not None:
    return "the Pallas kernels have no per-channel weight scale (wcscales)"
  m = x.size // max(w.in_features, 1)
  reason = kernels.unsupported_reason(m, w.in_features, w.out_features, w.rank,
                                      group_size=w.group_size, out_dtype=x.dtype)
  if reason is not None:
    return reason
  if not interpret and not kernels.is_supported():
    return "the Pallas kernels need a Hopper GPU (sm_90) as the default device"
  return None


def _auto_impl(x: jax.Array, w: SVDQLinear) -> str:
  """AUTO_ORDER: the fused kernels when they support the case, else XLA (which supports every
  case). On a GPU, a W4A4 layer that falls back to XLA says why, once per reason."""
  reason = pallas_unsupported_reason(x, w)
  if reason is None:
    return "pallas"
  if _backend() == "gpu" and w.format.quantizes_activations:
    _notice_once(reason, f"svdq_dot: {reason}; using the XLA reference")
  return "xla"


def _backend() -> str:
  return jax.default_backend()


def _notice_once(key: str, message: str) -> None:
  if key not in _NOTICES:
    _NOTICES.add(key)
    warnings.warn(message, stacklevel=5)


def _pallas_dot(x: jax.Array, w: SVDQLinear, bias: jax.Array | None, *, interpret: bool
                ) -> jax.Array:
  """The fused kernels on x flattened to (M, K); both biases folded into the epilogue's."""
  total_bias = w.bias
  if bias is not None:
    total_bias = bias.astype(jnp.float32) if total_bias is None else total_bias + bias
  lead = x.shape[:-1]
  y = kernels.svdq_linear(x.reshape(-1, w.in_features), w.qweight, w.wscales, w.smooth,
                          w.lora_down, w.lora_up, total_bias, group_size=w.group_size,
                          act_shift=w.act_shift, out_dtype=x.dtype, interpret=interpret)
  return y.reshape(*lead, w.out_features)
