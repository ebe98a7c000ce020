"""The CLIP text encoder (FLUX.1's and SDXL's `text_encoder`, SDXL's `text_encoder_2`) in Flax NNX.

Same math as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`: token plus learned
position embeddings, pre-LayerNorm blocks of causal self-attention and a two-layer MLP
(quick_gelu for OpenAI's ViT-L/14, exact gelu for OpenCLIP's ViT-bigG/14), a final LayerNorm, and
a pooled output taken at each sequence's end-of-text token. The WithProjection variant adds a
bias-free `text_projection` of the pooled output (SDXL's `text_embeds`).

Module and attribute names follow transformers (`encoder/layers/0/self_attn/q_proj/kernel` for
`encoder.layers.0.self_attn.q_proj.weight`). Inference only (no dropout). LayerNorms run in
float32; matmuls in the computation dtype.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import ACTIVATIONS as LAYER_ACTIVATIONS
from models.layers import LayerNorm, Linear, attention
from models.pretrained import load_pretrained
from svdq_jax.config_base import DictConfig

# The activations CLIP text configs name (`hidden_act`).
ACTIVATIONS = {name: LAYER_ACTIVATIONS[name] for name in ("quick_gelu", "gelu")}

# transformers' CLIP configs written before its PR #24773 carry eos_token_id 2; for them the pooled
# output is taken at the largest token id (the end-of-text token is the last id of CLIP's vocab).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(DictConfig):
  """Hyperparameters of a CLIP text encoder (names as transformers' `CLIPTextConfig`).

  `projection_dim`: None for `CLIPTextModel`, the output width of `text_projection` for
  `CLIPTextModelWithProjection`. `eos_token_id`: where the pooled output is read; 2 means the
  legacy rule (position of the largest token id), as in transformers.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = LEGACY_EOS_TOKEN_ID
  projection_dim: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextConfig: hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIPTextConfig.hidden_act {self.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    if not isinstance(self.eos_token_id, int):
      raise ValueError(f"CLIPTextConfig.eos_token_id must be one integer, got "
                       f"{self.eos_token_id!r}")
    if self.projection_dim is not None and (
        not isinstance(self.projection_dim, int) or self.projection_dim <= 0):
      raise ValueError(f"CLIPTextConfig.projection_dim must be None or a positive integer, got "
                       f"{self.projection_dim!r}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head: hidden_size / num_attention_heads."""
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def vit_l_14(cls) -> CLIPTextConfig:
    """openai/clip-vit-large-patch14's text model: FLUX.1's and SDXL's `text_encoder`."""
    return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
               layer_norm_eps=1e-5, eos_token_id=LEGACY_EOS_TOKEN_ID, projection_dim=None)

  @classmethod
  def bigg_14(cls) -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14's text model with its projection: SDXL's `text_encoder_2`."""
    return cls(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
               num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
               layer_norm_eps=1e-5, eos_token_id=LEGACY_EOS_TOKEN_ID, projection_dim=1280)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPTextOutput:
  """What `CLIPTextModel` returns (a pytree, so it leaves `jax.jit` as is).

  last_hidden_state: (B, T, hidden) after the final LayerNorm.
  pooler_output: (B, hidden), `last_hidden_state` at each sequence's end-of-text token.
  hidden_states: when asked, (embeddings, output of block 1, ..., output of block L), each
    (B, T, hidden) and before the final LayerNorm (SDXL reads `hidden_states[-2]`); else None.
  text_embeds: (B, projection_dim), `text_projection(pooler_output)`, for a model with a
    projection; else None.
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None
  text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nnx.Module):
  """Token embedding plus the learned embedding of positions 0..T-1."""

  def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[-1]
    positions = jnp.arange(length)
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/out projections, scaled by 1/sqrt(head_dim)."""

  def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    linear = partial(Linear, config.hidden_size, config.hidden_size, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear()
    self.k_proj = linear()
    self.v_proj = linear()
    self.out_proj = linear()

  def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Causal self-attention. hidden_states (B, T, hidden); mask: padding, bool (B, 1, 1, T) with
    True = attend, or None."""
    batch, length, width = hidden_states.shape
    heads = (batch, length, self.num_heads, self.head_dim)
    q = self.q_proj(hidden_states).reshape(heads)
    k = self.k_proj(hidden_states).reshape(heads)
    v = self.v_proj(hidden_states).reshape(heads)
    out = attention(q, k, v, mask=mask, is_causal=True)
    return self.out_proj(out.reshape(batch, length, width))


class CLIPMLP(nnx.Module):
  """fc2(act(fc1(x)))."""

  def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    self.act_name = config.hidden_act

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.act_name](self.fc1(hidden_states)))


class CLIPEncoderLayer(nnx.Module):
  """x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                 param_dtype=param_dtype)
    self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                 param_dtype=param_dtype)

  def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
    hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
    return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nnx.Module):
  """The stack of `CLIPEncoderLayer`s (transformers' `CLIPEncoder`)."""

  def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.layers = nnx.List([
        CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)
    ])

  def __call__(self, hidden_states: jax.Array,
               mask: jax.Array | None) -> tuple[jax.Array, ...]:
    """Returns (input, output of layer 1, ..., output of layer L)."""
    states = [hidden_states]
    for layer in self.layers:
      states.append(layer(states[-1], mask))
    return tuple(states)


class CLIPTextModel(nnx.Module):
  """CLIP text encoder: token ids (B, T) -> `CLIPTextOutput`.

  transformers' `CLIPTextModel`, or its `CLIPTextModelWithProjection` when the config has a
  `projection_dim`. `dtype` is the computation dtype (default: `param_dtype`); float32 and
  bfloat16 are supported.
  """

  def __init__(self, config: CLIPTextConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = CLIPEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                      param_dtype=param_dtype)
    self.text_projection = (
        Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
               param_dtype=param_dtype, rngs=rngs)
        if config.projection_dim is not None else None)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               output_hidden_states: bool = False) -> CLIPTextOutput:
    """Encodes token ids.

    Args:
      input_ids: (B, T) integer token ids, T <= max_position_embeddings. Each sequence should hold
        its end-of-text token (the tokenizer adds it); the pooled output is read there.
      attention_mask: (B, T), 1 (or True) for tokens and 0 for padding, or None. Attention is
        causal either way; the mask also hides padded keys.
      output_hidden_states: also return every block's input/output (static under jit).

    Returns:
      A `CLIPTextOutput` in the computation dtype.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"CLIPTextModel: input_ids must be (batch, length), got shape "
                       f"{input_ids.shape}")
    batch, length = input_ids.shape
    if length > self.config.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: sequence length {length} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    mask = None  # padding only: every layer's attention is causal on its own
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"CLIPTextModel: attention_mask shape {attention_mask.shape} differs "
                         f"from input_ids shape {input_ids.shape}")
      mask = attention_mask.astype(bool)[:, None, None, :]
    states = self.encoder(self.embeddings(input_ids), mask)
    last_hidden_state = self.final_layer_norm(states[-1])
    pooler_output = last_hidden_state[jnp.arange(batch), self._eos_positions(input_ids)]
    text_embeds = (self.text_projection(pooler_output)
                   if self.text_projection is not None else None)
    return CLIPTextOutput(last_hidden_state=last_hidden_state, pooler_output=pooler_output,
                          hidden_states=states if output_hidden_states else None,
                          text_embeds=text_embeds)

  def _eos_positions(self, input_ids: jax.Array) -> jax.Array:
    """(B,) position of each end-of-text token: the first `eos_token_id` or (legacy) largest id."""
    if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike,
                      dtype: jnp.dtype | None = None) -> CLIPTextModel:
    """Loads a transformers `CLIPTextModel` / `CLIPTextModelWithProjection` folder, or ours.

    `dtype` (e.g. `jnp.bfloat16`) is both the computation dtype and the dtype floating parameters
    are cast to; None: float32 parameters, computation in the input's dtype (a svdq-jax checkpoint
    keeps its stored dtypes).
    """
    return load_pretrained(path, "clip", dtype=dtype)
