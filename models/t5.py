"""The T5 encoder (T5 v1.1, as FLUX.1 and PixArt-Sigma use it) in Flax NNX, for inference.

Same math as transformers' `T5EncoderModel`: a shared token embedding, pre-norm blocks of
self-attention and a feed-forward layer, RMS norms ("T5LayerNorm": no mean, no bias), attention
without the 1/sqrt(d) scaling, and a bucketed relative position bias that the first block owns and
every block adds to its attention logits. T5 v1.1 uses the gated-gelu feed-forward
(`gelu_new`, the tanh approximation, times a linear gate); the original T5's relu one also works.

Module and attribute names follow transformers, so a parameter's state path reads like its
checkpoint key (`encoder/block/0/layer/0/SelfAttention/q/kernel` for
`encoder.block.0.layer.0.SelfAttention.q.weight`).

Precision: in bfloat16 every matmul runs in bfloat16 while the RMS norms, the attention logits, the
relative position bias and the softmax are float32. transformers keeps the feed-forward output
projection `wo` in float32 only for float16 (`_keep_in_fp32_modules`), because T5 v1.1 activations
overflow float16's range; bfloat16 has float32's exponent range and needs no such measure. float16
is refused with a ValueError rather than silently producing inf/NaN.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import ACTIVATIONS as LAYER_ACTIVATIONS
from models.layers import Linear, RMSNorm, attention
from models.pretrained import load_pretrained
from svdq_jax.config_base import DictConfig

# The feed-forward activations T5 configs name (see `T5Config.dense_act_fn`).
ACTIVATIONS = {name: LAYER_ACTIVATIONS[name] for name in ("relu", "gelu", "gelu_new", "silu")}


@dataclasses.dataclass(frozen=True)
class T5Config(DictConfig):
  """Hyperparameters of a T5 encoder (the names are those of transformers' `T5Config`).

  `feed_forward_proj` is "ACT" (dense-act-dense) or "gated-ACT" (act(wi_0 x) * wi_1 x); as in
  transformers, "gated-gelu" means the tanh-approximate gelu ("gelu_new").
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config.relative_attention_num_buckets must be at least 4 (half per "
                       "direction, half of those exact), got "
                       f"{self.relative_attention_num_buckets}")
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"T5Config.feed_forward_proj must be 'ACT' or 'gated-ACT', got "
                       f"{self.feed_forward_proj!r}")
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"T5Config.feed_forward_proj {self.feed_forward_proj!r}: activation "
                       f"{self.dense_act_fn!r} is not one of {sorted(ACTIVATIONS)}")

  @property
  def is_gated_act(self) -> bool:
    """Whether the feed-forward layer is gated (wi_0, wi_1, wo) rather than (wi, wo)."""
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    """The activation's name in `ACTIVATIONS` ("gated-gelu" maps to "gelu_new", as transformers)."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def v1_1_xxl(cls) -> T5Config:
    """google/t5-v1_1-xxl's encoder: FLUX.1's `text_encoder_2` and PixArt-Sigma's text encoder."""
    return cls(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")


def relative_position_bucket(relative_position: jax.Array, *, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """Bidirectional T5 bucket of each relative position (key index - query index), int32.

  Half of the buckets are for positive offsets. Within a direction, offsets below half of its
  buckets each get their own bucket; larger ones share logarithmically wider buckets up to
  `max_distance`, beyond which all fall into the last bucket. Computed in float32 as transformers
  does, so that the truncation lands on the same bucket.
  """
  per_direction = num_buckets // 2
  direction = jnp.where(relative_position > 0, per_direction, 0)
  distance = jnp.abs(relative_position)
  max_exact = per_direction // 2
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
            / jnp.float32(math.log(max_distance / max_exact)) * (per_direction - max_exact))
  far = jnp.minimum(max_exact + scaled.astype(jnp.int32), per_direction - 1)
  return (direction + jnp.where(distance < max_exact, distance, far)).astype(jnp.int32)


class T5Attention(nnx.Module):
  """Unscaled multi-head self-attention with an additive position bias; q, k, v, o have no bias."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.d_kv = config.d_kv
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    inner = config.num_heads * config.d_kv
    linear = partial(Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = linear(config.d_model, inner)
    self.k = linear(config.d_model, inner)
    self.v = linear(config.d_model, inner)
    self.o = linear(inner, config.d_model)
    self.relative_attention_bias = (
        nnx.Embed(config.relative_attention_num_buckets, config.num_heads, dtype=jnp.float32,
                  param_dtype=param_dtype, rngs=rngs)
        if has_relative_attention_bias else None)

  def compute_bias(self, query_length: int, key_length: int) -> jax.Array:
    """The relative position bias (1, num_heads, query_length, key_length), float32."""
    if self.relative_attention_bias is None:
      raise ValueError("T5Attention.compute_bias: this layer has no relative_attention_bias "
                       "(only the first block's self-attention owns it)")
    relative = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    buckets = relative_position_bucket(relative, num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

  def __call__(self, hidden_states: jax.Array, *, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    """hidden_states (B, T, d_model); position_bias (1, H, T, T) f32; mask (B, 1, 1, T) bool."""
    batch, length, _ = hidden_states.shape
    heads = (batch, length, self.num_heads, self.d_kv)
    q = self.q(hidden_states).reshape(heads)
    k = self.k(hidden_states).reshape(heads)
    v = self.v(hidden_states).reshape(heads)
    out = attention(q, k, v, bias=position_bias, mask=mask, scale=1.0)
    return self.o(out.reshape(batch, length, self.num_heads * self.d_kv))


class T5LayerSelfAttention(nnx.Module):
  """Pre-norm residual self-attention: x + attn(rms_norm(x))."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.SelfAttention = T5Attention(
        config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                              param_dtype=param_dtype)

  def __call__(self, hidden_states: jax.Array, *, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    attended = self.SelfAttention(self.layer_norm(hidden_states), position_bias=position_bias,
                                  mask=mask)
    return hidden_states + attended


class T5DenseActDense(nnx.Module):
  """The original T5 feed-forward: wo(act(wi(x)))."""

  def __init__(self, config: T5Config, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    linear = partial(Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi = linear(config.d_model, config.d_ff)
    self.wo = linear(config.d_ff, config.d_model)
    self.act_name = config.dense_act_fn

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    return self.wo(ACTIVATIONS[self.act_name](self.wi(hidden_states)))


class T5DenseGatedActDense(nnx.Module):
  """The T5 v1.1 feed-forward: wo(act(wi_0(x)) * wi_1(x))."""

  def __init__(self, config: T5Config, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    linear = partial(Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = linear(config.d_model, config.d_ff)
    self.wi_1 = linear(config.d_model, config.d_ff)
    self.wo = linear(config.d_ff, config.d_model)
    self.act_name = config.dense_act_fn

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    gate = ACTIVATIONS[self.act_name](self.wi_0(hidden_states))
    return self.wo(gate * self.wi_1(hidden_states))


class T5LayerFF(nnx.Module):
  """Pre-norm residual feed-forward: x + ff(rms_norm(x))."""

  def __init__(self, config: T5Config, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
    self.DenseReluDense = dense(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                              param_dtype=param_dtype)

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class T5Block(nnx.Module):
  """One encoder block: `layer` = [self-attention, feed-forward], as transformers' `T5Block`."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.layer = nnx.List([
        T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        T5LayerFF(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    ])

  def __call__(self, hidden_states: jax.Array, *, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    hidden_states = self.layer[0](hidden_states, position_bias=position_bias, mask=mask)
    return self.layer[1](hidden_states)


class T5Stack(nnx.Module):
  """The encoder blocks and the final RMS norm (its token embedding is `T5Encoder.shared`)."""

  def __init__(self, config: T5Config, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.block = nnx.List([
        T5Block(config, has_relative_attention_bias=(i == 0), dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
        for i in range(config.num_layers)
    ])
    self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                                    param_dtype=param_dtype)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """inputs_embeds (B, T, d_model); attention_mask (B, T), nonzero = token, 0 = padding."""
    length = inputs_embeds.shape[1]
    position_bias = self.block[0].layer[0].SelfAttention.compute_bias(length, length)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    hidden_states = inputs_embeds
    for block in self.block:
      hidden_states = block(hidden_states, position_bias=position_bias, mask=mask)
    return self.final_layer_norm(hidden_states)


class T5Encoder(nnx.Module):
  """transformers' `T5EncoderModel`: token ids (B, T) -> last hidden state (B, T, d_model).

  `dtype` is the computation dtype (default: `param_dtype`); float32 and bfloat16 are supported.
  Inference only (no dropout).
  """

  def __init__(self, config: T5Config, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    compute_dtype = jnp.dtype(dtype if dtype is not None else param_dtype)
    if compute_dtype == jnp.float16:
      raise ValueError("T5Encoder: float16 is not supported (T5 v1.1 activations overflow "
                       "float16); use bfloat16 or float32")
    self.config = config
    self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.encoder = T5Stack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: (B, T) integer token ids (ids outside the vocabulary give NaN rows).
      attention_mask: (B, T), 1 (or True) for tokens and 0 for padding, or None for no padding.
        Padded keys are ignored by every query; padded positions still get an output.

    Returns:
      last_hidden_state (B, T, d_model) in the computation dtype.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"T5Encoder: input_ids must be (batch, length), got shape {input_ids.shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"T5Encoder: attention_mask shape {attention_mask.shape} differs from "
                       f"input_ids shape {input_ids.shape}")
    return self.encoder(self.shared(input_ids), attention_mask)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: jnp.dtype | None = None) -> T5Encoder:
    """Loads a transformers `T5EncoderModel` folder (config.json + safetensors) or one of ours.

    `dtype` (e.g. `jnp.bfloat16`) is both the computation dtype and the dtype floating parameters
    are cast to; None: float32 parameters, computation in the input's dtype (a svdq-jax checkpoint
    keeps its stored dtypes).
    """
    return load_pretrained(path, "t5", dtype=dtype)
