"""`svdq_dot`: the one entry point every model linear layer calls.

It accepts a plain kernel (K, N) or an `SVDQLinear`, so model code never branches on quantization.
While `calibrate` runs, it also reports each call's activations to the active recorder (a context
variable read at trace time only: no cost under `jax.jit`).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from svdq_jax import calibration, qlinear

Impl = Literal["auto", "xla", "pallas", "pallas-interpret"]


def svdq_dot(
    x: jax.Array,
    w: Any,
    *,
    bias: jax.Array | None = None,
    impl: Impl = "auto",
) -> jax.Array:
  """Computes `x @ w + bias` for a plain kernel or an `SVDQLinear`.

  Args:
    x: activations (..., K), any float dtype; any leading batch shape.
    w: a plain kernel (K, N) or an `SVDQLinear`.
    bias: the layer's own bias (N,) or None. For an `SVDQLinear` its folded `w.bias` is added too.
    impl: "xla" (reference, any backend), "pallas" (fused GPU kernels), "pallas-interpret" (the
      same kernels on CPU), or "auto" (kernels on a supported GPU, XLA elsewhere).

  Returns:
    (..., N) in x's dtype.
  """
  recorder = calibration.active_recorder()
  if recorder is not None:
    recorder.record(w, x)
  if isinstance(w, qlinear.SVDQLinear):
    return qlinear.quantized_dot(x, w, bias=bias, impl=impl)
  if not hasattr(w, "shape") or len(w.shape) != 2:
    raise ValueError(f"svdq_dot: w must be a 2-D kernel (K, N) or an SVDQLinear, got "
                     f"{type(w).__name__} with shape {getattr(w, 'shape', None)}")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"svdq_dot: x has {x.shape[-1]} input features, kernel expects {w.shape[0]}")
  y = jnp.matmul(x, w.astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y
