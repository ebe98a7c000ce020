"""Shared Flax NNX building blocks. Every linear goes through `svdq_dot`.

Parameters follow flax conventions: `Linear.kernel` is (in, out), `Conv2d.kernel` is HWIO,
norms have `scale` and `bias`. Converters transpose torch's (out, in) / OIHW into these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax import svdq_dot


def _zeros(shape, dtype):
  return jnp.zeros(shape, dtype)


class Linear(nnx.Module):
  """`y = x @ kernel + bias` through `svdq_dot`; `kernel` may be replaced by an `SVDQLinear`.

  kernel: (in_features, out_features) param_dtype; bias: (out_features,) or absent.
  Computation happens in `dtype` (default: the input's dtype).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    bound = 1.0 / math.sqrt(in_features)
    self.kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (in_features, out_features), param_dtype, -bound, bound))
    self.bias = (
        nnx.Param(jax.random.uniform(rngs.params(), (out_features,), param_dtype, -bound, bound))
        if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    bias = self.bias.get_value() if self.bias is not None else None
    return svdq_dot(x, self.kernel.get_value(), bias=bias)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32; optional affine `scale`/`bias` (D,)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, elementwise_affine: bool = True,
               use_bias: bool = True, param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if elementwise_affine else None
    self.bias = (nnx.Param(jnp.zeros((dim,), param_dtype))
                 if elementwise_affine and use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis in float32, with a learned `scale` (D,) (T5 / FLUX q-k norm)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over channels-last (N, H, W, C) input, in float32, affine `scale`/`bias` (C,)."""

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-6,
               param_dtype: jnp.dtype = jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
    self.num_groups = num_groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    xf = x.astype(jnp.float32).reshape(*shape[:-1], self.num_groups, shape[-1] // self.num_groups)
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class Conv2d(nnx.Module):
  """2-D convolution on channels-last (N, H, W, C) input. kernel: HWIO; bias: (out,)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, use_bias: bool = True, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.padding = padding
    self.dtype = dtype
    fan_in = in_channels * kernel_size * kernel_size
    bound = 1.0 / math.sqrt(fan_in)
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (kernel_size, kernel_size, in_channels, out_channels), param_dtype,
        -bound, bound))
    self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), param_dtype,
                                              -bound, bound)) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), (self.stride, self.stride), [(p, p), (p, p)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (B,) -> (B, dim) float32, as diffusers' `get_timestep_embedding`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - downscale_freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = scale * emb
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
  """Multi-head attention on (B, T, H, D) tensors via `jax.nn.dot_product_attention`.

  mask: boolean, broadcastable to (B, H, Tq, Tk), True = attend. Uses cuDNN on GPU where it applies.
  """
  implementation = "cudnn" if _cudnn_ok(q, mask) else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      implementation=implementation)


def _cudnn_ok(q: jax.Array, mask: jax.Array | None) -> bool:
  try:
    platform = jax.devices()[0].platform
  except RuntimeError:
    return False
  return (platform == "gpu" and mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] <= 128)
