"""`svdq_dot`: the one entry point every model linear layer calls.

It accepts a plain kernel (K, N) or an `SVDQLinear`, so model code never branches on quantization.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

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
    bias: the layer's own bias (N,) or None.
    impl: "xla" (reference, any backend), "pallas" (fused GPU kernels), "pallas-interpret" (the
      same kernels on CPU), or "auto" (kernels on a supported GPU, XLA elsewhere).

  Returns:
    (..., N) in x's dtype.
  """
  if isinstance(w, jax.Array | jnp.ndarray) or hasattr(w, "shape") and not hasattr(w, "qweight"):
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f"svdq_dot: x has {x.shape[-1]} input features, kernel expects {w.shape[0]}")
    y = jnp.matmul(x, w.astype(x.dtype))
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return y
  from svdq_jax import qlinear  # noqa: PLC0415  (filled in by the transform)

  return qlinear.quantized_dot(x, w, bias=bias, impl=impl)
