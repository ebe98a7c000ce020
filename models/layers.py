"""Shared Flax NNX building blocks. Every linear goes through `svdq_dot`.

Parameters follow flax conventions: `Linear.kernel` is (in, out), `Conv2d.kernel` is HWIO,
norms have `scale` and `bias`. Converters transpose torch's (out, in) / OIHW into these
(`convert.mapping`). The diffusers blocks several models share (`Attention`, `MLPEmbedder`,
`FeedForward`) keep diffusers' attribute names, so their parameter paths are the checkpoint keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax import Impl, svdq_dot

# Activations by their transformers / diffusers config names. Each model accepts its own subset.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),  # transformers' name for the tanh GELU
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class Linear(nnx.Module):
  """`y = x @ kernel + bias` through `svdq_dot`; `kernel` may be replaced by an `SVDQLinear`.

  kernel: (in_features, out_features) param_dtype; bias: (out_features,) or absent.
  Computation happens in `dtype` (default: the input's dtype). `impl` picks the implementation of
  a quantized kernel (`svdq_dot`'s; None follows `svdq_jax.use_impl`, else "auto").
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      impl: Impl | None = None,
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.impl = impl
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
    return svdq_dot(x, self.kernel.get_value(), bias=bias, impl=self.impl)


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
              bias: jax.Array | None = None, is_causal: bool = False,
              scale: float | None = None) -> jax.Array:
  """Multi-head attention on (B, T, H, D) tensors via `jax.nn.dot_product_attention`.

  Args:
    q: (B, Tq, H, D) queries; k, v: (B, Tk, H, D).
    mask: boolean, broadcastable to (B, H, Tq, Tk), True = attend; or None.
    bias: additive logit bias broadcastable to (B, H, Tq, Tk) (T5's position bias); or None.
    is_causal: query i attends only keys <= i (combined with `mask`).
    scale: logit scale; None means 1/sqrt(D).

  Uses cuDNN on GPU where it applies (no mask, no bias, 16-bit inputs, D <= 128).
  """
  implementation = "cudnn" if _cudnn_ok(q, mask, bias) else None
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      is_causal=is_causal, implementation=implementation)


def _cudnn_ok(q: jax.Array, mask: jax.Array | None, bias: jax.Array | None) -> bool:
  try:
    platform = jax.devices()[0].platform
  except RuntimeError:
    return False
  return (platform == "gpu" and mask is None and bias is None
          and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128)


class Attention(nnx.Module):
  """Multi-head (self- or cross-) attention with diffusers' `to_q/to_k/to_v/to_out.0` layers.

  Parameter paths are diffusers' `Attention` keys; `to_out` is a list whose index 1 (dropout in
  diffusers) is absent, so `to_out.0` is the output projection.
  """

  def __init__(self, query_dim: int, heads: int, head_dim: int, *, kv_dim: int | None = None,
               use_bias: bool = True, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    inner = heads * head_dim
    kv_dim = query_dim if kv_dim is None else kv_dim
    self.heads = heads
    self.head_dim = head_dim
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q = Linear(query_dim, inner, **kw)
    self.to_k = Linear(kv_dim, inner, **kw)
    self.to_v = Linear(kv_dim, inner, **kw)
    self.to_out = nnx.List([Linear(inner, query_dim, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)])

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """x (B, Tq, Dq); context (B, Tk, Dkv) or None (self-attention); mask bool, broadcastable
    to (B, H, Tq, Tk), True = attend. Returns (B, Tq, Dq)."""
    context = x if context is None else context
    b, tq, _ = x.shape
    tk = context.shape[1]
    q = self.to_q(x).reshape(b, tq, self.heads, self.head_dim)
    k = self.to_k(context).reshape(b, tk, self.heads, self.head_dim)
    v = self.to_v(context).reshape(b, tk, self.heads, self.head_dim)
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
    return self.to_out[0](out.reshape(b, tq, self.heads * self.head_dim))


class MLPEmbedder(nnx.Module):
  """`linear_2(act(linear_1(x)))`, (..., in_features) -> (..., out_features).

  diffusers' `TimestepEmbedding` (SiLU) and `PixArtAlphaTextProjection` (tanh GELU or SiLU): the
  MLPs on the sinusoidal timestep / guidance embedding and on pooled or caption text features.
  """

  def __init__(self, in_features: int, out_features: int, *, act: str = "silu",
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if act not in ACTIVATIONS:
      raise ValueError(f"MLPEmbedder: activation {act!r} is not one of {sorted(ACTIVATIONS)}")
    self.act = act
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(in_features, out_features, **kw)
    self.linear_2 = Linear(out_features, out_features, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(ACTIVATIONS[self.act](self.linear_1(x)))


class GELUProjection(nnx.Module):
  """`gelu_tanh(proj(x))`: diffusers' `GELU(approximate="tanh")`, a feed-forward's input layer."""

  def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.proj = Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(self.proj(x), approximate=True)


class GEGLU(nnx.Module):
  """`a * gelu(b)` with `(a, b)` the two halves of `proj(x)`: diffusers' `GEGLU` (exact GELU), the
  gated feed-forward input layer of the SD / SDXL UNet's transformer blocks. (..., dim) ->
  (..., hidden) through a `2 * hidden`-wide projection."""

  def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.proj = Linear(dim, 2 * hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


FEED_FORWARD_INPUTS = {"gelu-approximate": GELUProjection, "geglu": GEGLU}


class FeedForward(nnx.Module):
  """`net.2(act(net.0(x)))`: diffusers' `FeedForward` with `activation_fn` "gelu-approximate"
  (`net.0` is `GELUProjection`, the DiTs') or "geglu" (`net.0` is `GEGLU`, the UNets').

  `net` mirrors diffusers' ModuleList([GELU, Dropout, Linear]); index 1 (dropout, nothing at
  inference) is None, kept so that the parameter paths are the checkpoint keys (`ff.net.2`).
  (..., dim) -> (..., dim) through a `hidden`-wide layer.
  """

  def __init__(self, dim: int, hidden: int, *, activation_fn: str = "gelu-approximate",
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if activation_fn not in FEED_FORWARD_INPUTS:
      raise ValueError(f"FeedForward: activation_fn {activation_fn!r} is not one of "
                       f"{sorted(FEED_FORWARD_INPUTS)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.net = nnx.List([FEED_FORWARD_INPUTS[activation_fn](dim, hidden, **kw), None,
                         Linear(hidden, dim, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[0](x))
