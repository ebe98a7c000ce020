"""`svdq_dot`: the one entry point every model linear layer calls, and its dispatch.

It accepts a plain kernel (K, N) or an `SVDQLinear`, so model code never branches on quantization.
For an `SVDQLinear` the implementation is, in order of precedence, the `impl` argument, the
innermost `use_impl` context, or "auto". Like tokamax's ops, "auto" tries the implementations
from the most specialised to the one that runs everywhere (`AUTO_ORDER`: the fused Pallas kernels,
then the XLA reference) and takes the first that supports the case; a single named implementation
that cannot serve the case raises an InputError saying why instead of falling back.
The choice is made at trace time: a function jitted under one implementation keeps it. The first
time the kernels would run for a configuration, `kernel_check` compares them once with the XLA
path; kernels that failed are not used again ("auto" takes XLA, a named Pallas impl raises).

While `calibrate` runs, `svdq_dot` also reports each call's activations to the active recorder (a
context variable read at trace time only: no cost under `jax.jit`).

Gradients (LoRA training on a 4-bit base): the product with an `SVDQLinear` has a custom VJP
(`jax.custom_vjp`) whatever the implementation. Its backward pass treats the quantizers as the
identity (straight-through): the input's cotangent is `g @ kernel.T` with the layer's effective
kernel (residual / smooth + lora_down @ lora_up) rebuilt from the packed codes inside the backward
pass, one layer at a time, so no float copy of the model is ever held; the low-rank branch and the
bias get their exact gradients; the frozen 4-bit weight and its scales get none (float0 for the
codes, zeros for the scales). A `LoRAKernel` adds its trainable float32 branch to the product.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.svdq_linear as kernels
from svdq_jax import calibration, kernel_check
from svdq_jax.errors import InputError
from svdq_jax.lora import LoRAKernel
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
    w: a plain kernel (K, N), an `SVDQLinear`, or a `LoRAKernel` wrapping either.
    bias: the layer's own bias (N,) or None. For an `SVDQLinear` its folded `w.bias` is added too.
    impl: one of `IMPLS`, or None for `current_impl()` (see the module docstring). A plain kernel
      is always a jnp.matmul.

  Returns:
    (..., N) in x's dtype.

  Raises:
    InputError for an unknown `impl`, or a Pallas `impl` that cannot compute this layer.
  """
  if isinstance(w, LoRAKernel):
    return _lora_kernel_dot(x, w, bias, impl)
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
    kernel_check.require_kernels(x, w, interpret=impl == "pallas-interpret")
  return _differentiable_dot(x, w, bias, impl)


def _forward(x: jax.Array, w: SVDQLinear, bias: jax.Array | None, impl: str) -> jax.Array:
  if impl == "xla":
    return xla_dot(x, w, bias)
  return _pallas_dot(x, w, bias, interpret=impl == "pallas-interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _differentiable_dot(x: jax.Array, w: SVDQLinear, bias: jax.Array | None, impl: str
                        ) -> jax.Array:
  """`_forward` with the straight-through backward pass of the module docstring."""
  return _forward(x, w, bias, impl)


def _differentiable_dot_fwd(x, w, bias, impl):
  return _forward(x, w, bias, impl), (x, w, bias)


def _frozen_cotangent(leaf: jax.Array) -> Any:
  """No gradient for a frozen array: float0 for integer codes, zeros for float scales."""
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return jnp.zeros_like(leaf)
  return np.zeros(leaf.shape, jax.dtypes.float0)


def _differentiable_dot_bwd(impl, residuals, g):
  del impl
  x, w, bias = residuals
  k, n = w.in_features, w.out_features
  x2 = x.reshape(-1, k).astype(jnp.float32)
  g2 = g.reshape(-1, n).astype(jnp.float32)
  # The barrier orders this layer's dequantization after its output cotangent exists, so that
  # the backward pass never holds the dequantized kernels of several layers at once.
  g2, frozen = jax.lax.optimization_barrier((g2, (w.qweight, w.wscales, w.wtscale, w.smooth)))
  qweight, wscales, wtscale, smooth = frozen
  codes = dataclasses.replace(w, qweight=qweight, wscales=wscales, wtscale=wtscale,
                              smooth=smooth)
  residual = codes.dequantize_residual() / smooth[:, None]  # (K, N) float32, this layer only
  dx = g2 @ residual.T
  d_down, d_up = w.lora_down, w.lora_up
  if w.rank:
    down = w.lora_down.astype(jnp.float32)
    up = w.lora_up.astype(jnp.float32)
    g_up = g2 @ up.T  # (M, r)
    dx = dx + g_up @ down.T
    d_down = (x2.T @ g_up).astype(w.lora_down.dtype)
    d_up = ((x2 @ down).T @ g2).astype(w.lora_up.dtype)
  g_sum = g2.sum(axis=0)
  dw = dataclasses.replace(
      w, qweight=_frozen_cotangent(w.qweight), wscales=_frozen_cotangent(w.wscales),
      wtscale=_frozen_cotangent(w.wtscale), smooth=_frozen_cotangent(w.smooth),
      lora_down=d_down, lora_up=d_up,
      bias=None if w.bias is None else g_sum.astype(w.bias.dtype))
  d_bias = None if bias is None else g_sum.astype(bias.dtype)
  return dx.astype(x.dtype).reshape(x.shape), dw, d_bias


_differentiable_dot.defvjp(_differentiable_dot_fwd, _differentiable_dot_bwd)


def _lora_kernel_dot(x: jax.Array, w: LoRAKernel, bias: jax.Array | None, impl: Impl | None
                     ) -> jax.Array:
  """The wrapped kernel's product plus the trainable branch scale * (x @ lora_down) @ lora_up,
  computed and added in float32."""
  y = svdq_dot(x, w.kernel, bias=bias, impl=impl)
  x32 = x.astype(jnp.float32)
  delta = (x32 @ w.lora_down.astype(jnp.float32)) @ w.lora_up.astype(jnp.float32)
  return (y.astype(jnp.float32) + w.scale * delta).astype(y.dtype)


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
  """AUTO_ORDER: the fused kernels when they support the case and pass their once-per-process
  check (`kernel_check`), else XLA (which supports every case). On a GPU, a W4A4 layer that falls
  back to XLA says why, once per reason."""
  reason = pallas_unsupported_reason(x, w)
  if reason is None:
    return "xla" if kernel_check.kernels_failed(x, w) else "pallas"
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
