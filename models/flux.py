"""The FLUX.1 transformer (dev and schnell) in Flax NNX, numerically matching diffusers.

Structure and parameter names follow diffusers' `FluxTransformer2DModel`, so the NNX state path of
a parameter reads like its checkpoint key (`transformer_blocks/0/attn/to_q/kernel` holds
`transformer_blocks.0.attn.to_q.weight`, transposed to (in, out)). Every linear layer is a
`models.layers.Linear`, so `svdq_jax.quantize_params` can turn any of them into an SVDQuant layer.

Sequence layout: the joint sequence is the text tokens followed by the image tokens, and the rotary
position ids are `concat(txt_ids, img_ids)`, as in diffusers.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (
  FeedForward,
  LayerNorm,
  Linear,
  MLPEmbedder,
  RMSNorm,
  attention,
  timestep_embedding,
)
from models.pretrained import load_pretrained
from svdq_jax.config_base import DictConfig

_TIMESTEP_CHANNELS = 256  # width of the sinusoidal timestep / guidance embedding
_TIMESTEP_SCALE = 1000.0  # diffusers multiplies timestep and guidance (in [0, 1]) by this
_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FluxConfig(DictConfig):
  """Hyperparameters of a FLUX.1 transformer, named as in diffusers' config.json.

  Defaults are FLUX.1's (diffusers' defaults: no guidance embedding, i.e. schnell).
  """

  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  mlp_ratio: float = 4.0
  # Single blocks project the attention output and the MLP hidden state with two linears whose
  # outputs are summed (`proj_out`, D -> D, and `proj_out_mlp`, 4D -> D, with the bias), as
  # Nunchaku does, so each part is quantized on its own (the MLP part on shifted unsigned INT4
  # activations). Not a diffusers field: diffusers checkpoints hold one `proj_out` (5D -> D).
  split_proj_out: bool = False

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
    positive = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim")
    for name in positive:
      if int(getattr(self, name)) < 1:
        raise ValueError(f"FluxConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_layers < 0 or self.num_single_layers < 0:
      raise ValueError(f"FluxConfig: block counts must be >= 0, got num_layers={self.num_layers}, "
                       f"num_single_layers={self.num_single_layers}")
    if self.out_channels is not None and self.out_channels < 1:
      raise ValueError(f"FluxConfig.out_channels must be >= 1 or None, got {self.out_channels}")
    if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
      raise ValueError(f"FluxConfig.axes_dims_rope must be positive even sizes, got "
                       f"{self.axes_dims_rope}")
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"FluxConfig: axes_dims_rope {self.axes_dims_rope} must sum to "
                       f"attention_head_dim {self.attention_head_dim}")

  @property
  def inner_dim(self) -> int:
    """Hidden width of the transformer: heads x head_dim (3072 for FLUX.1)."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden_dim(self) -> int:
    """Hidden width of the feed-forward layers (4 x inner_dim)."""
    return int(self.inner_dim * self.mlp_ratio)

  @property
  def proj_out_dim(self) -> int:
    """Output channels per token: patch_size**2 x out_channels (out_channels defaults to in)."""
    return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

  @classmethod
  def dev(cls) -> FluxConfig:
    """FLUX.1-dev: 19 double + 38 single blocks, 24 x 128 heads, guidance embedding."""
    return cls(guidance_embeds=True)

  @classmethod
  def schnell(cls) -> FluxConfig:
    """FLUX.1-schnell: as dev, without the guidance embedding."""
    return cls(guidance_embeds=False)


def rope_frequencies(ids: jax.Array, axes_dims: tuple[int, ...],
                     theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """Cosines and sines of FLUX's multi-axis rotary embedding.

  Axis `i` of the position ids rotates `axes_dims[i]` consecutive channels of each head, in pairs
  (2j, 2j+1), with frequencies `theta ** (-2j / axes_dims[i])` (diffusers' `FluxPosEmbed`).

  Args:
    ids: (S, n_axes) positions (any real dtype), one row per token of the joint sequence.
    axes_dims: channels per axis; even, summing to the head dim.
    theta: the RoPE base.

  Returns:
    (cos, sin), each (S, head_dim // 2) float32: one angle per channel pair.
  """
  if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
    raise ValueError(f"rope_frequencies: ids must be (S, {len(axes_dims)}), got {ids.shape}")
  # Frequencies in float64 (as diffusers), rounded once to float32; the angles are float32, off by
  # about |angle| * 2**-24 (1e-5 rad at position 128) from diffusers' float64 ones.
  inv_freqs = np.concatenate(
      [1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims])
  axis_of_pair = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
  angles = ids.astype(jnp.float32)[:, axis_of_pair] * jnp.asarray(inv_freqs, jnp.float32)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates channel pairs (2j, 2j+1) of `x` (B, S, H, D) by the angles of `cos`/`sin` (S, D/2).

  Computed in float32, returned in x's dtype.
  """
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  rotated = jnp.stack([real * c - imag * s, imag * c + real * s], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class TimestepGuidanceTextEmbedding(nnx.Module):
  """The conditioning vector `temb` (B, D): embedded timestep (+ guidance) + pooled text.

  diffusers' `CombinedTimestepGuidanceTextProjEmbeddings` (dev) or
  `CombinedTimestepTextProjEmbeddings` (schnell, `guidance_embedder` is None).
  """

  def __init__(self, config: FluxConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = config.inner_dim
    self.timestep_embedder = MLPEmbedder(_TIMESTEP_CHANNELS, dim, **kw)
    self.guidance_embedder = (MLPEmbedder(_TIMESTEP_CHANNELS, dim, **kw)
                              if config.guidance_embeds else None)
    self.text_embedder = MLPEmbedder(config.pooled_projection_dim, dim, **kw)

  def __call__(self, timestep: jax.Array, guidance: jax.Array | None,
               pooled_projections: jax.Array) -> jax.Array:
    """timestep, guidance: (B,) already scaled to [0, 1000]; pooled_projections: (B, P)."""
    dtype = pooled_projections.dtype
    emb = self.timestep_embedder(_sinusoidal(timestep).astype(dtype))
    if self.guidance_embedder is not None:
      emb = emb + self.guidance_embedder(_sinusoidal(guidance).astype(dtype))
    return emb + self.text_embedder(pooled_projections)


def _scaled_in(t: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """`t.to(dtype) * 1000` rounded as diffusers (and BFL's reference) round it, as float32.

  In bfloat16 the product is rounded to 8 significant bits (guidance 3.5 becomes 3504), which
  changes the sinusoidal embedding; the model runs like that in bf16 pipelines, so we keep it.
  `reduce_precision` makes the rounding explicit, so that XLA's excess-precision rewrites under jit
  cannot drop it.
  """
  t = t.astype(jnp.float32)
  if jnp.dtype(dtype) == jnp.float32:
    return t * _TIMESTEP_SCALE
  info = jnp.finfo(dtype)
  round_to = lambda x: jax.lax.reduce_precision(x, exponent_bits=info.nexp,
                                                mantissa_bits=info.nmant)
  return round_to(round_to(t) * _TIMESTEP_SCALE)


def _sinusoidal(t: jax.Array) -> jax.Array:
  """diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`: (B,) -> (B, 256)."""
  return timestep_embedding(t, _TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0.0)


class AdaLayerNormZero(nnx.Module):
  """AdaLN-Zero modulation: `linear(silu(temb))` split into `num_chunks` (B, D) vectors.

  The normalization itself (LayerNorm without affine, eps 1e-6) is `norm`; the caller applies
  `norm(x) * (1 + scale) + shift` and the gates. num_chunks is 6 for the double-stream blocks
  (diffusers' AdaLayerNormZero) and 3 for the single-stream ones (AdaLayerNormZeroSingle).
  """

  def __init__(self, dim: int, num_chunks: int, *, dtype: jnp.dtype | None,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.num_chunks = num_chunks
    self.linear = Linear(dim, num_chunks * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=_NORM_EPS, elementwise_affine=False)

  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    """temb (B, D) -> `num_chunks` modulation vectors (B, D): shift, scale, gate, ..."""
    return jnp.split(self.linear(jax.nn.silu(temb)), self.num_chunks, axis=-1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """`x * (1 + scale) + shift` with (B, D) modulation broadcast over the tokens of x (B, S, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormContinuous(nnx.Module):
  """Final norm: LayerNorm (no affine, eps 1e-6) modulated by `linear(silu(temb))` = (scale, shift).

  Note the chunk order (scale first), the reverse of AdaLN-Zero.
  """

  def __init__(self, dim: int, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.linear = Linear(dim, 2 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=_NORM_EPS, elementwise_affine=False)

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb).astype(x.dtype)), 2, axis=-1)
    return _modulate(self.norm(x), shift, scale)


class FluxAttention(nnx.Module):
  """Multi-head attention with RMS q/k norms and rotary embedding (diffusers' FluxAttention).

  With `added_kv_proj_dim` (double-stream blocks) it is joint attention: the text stream has its
  own projections (`add_{q,k,v}_proj`, `norm_added_{q,k}`, `to_add_out`) and attends together with
  the image stream over `concat(text, image)`. With `pre_only` (single-stream blocks) there is no
  output projection (`to_out`): the block's `proj_out` takes the attention output directly.
  """

  def __init__(self, dim: int, heads: int, head_dim: int, *, added_kv_proj_dim: int | None = None,
               pre_only: bool = False, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * head_dim
    self.heads = heads
    self.head_dim = head_dim
    self.norm_q = RMSNorm(head_dim, eps=_NORM_EPS, param_dtype=param_dtype)
    self.norm_k = RMSNorm(head_dim, eps=_NORM_EPS, param_dtype=param_dtype)
    self.to_q = Linear(dim, inner, **kw)
    self.to_k = Linear(dim, inner, **kw)
    self.to_v = Linear(dim, inner, **kw)
    # diffusers' to_out is ModuleList([Linear, Dropout]): index 0 keeps the key `to_out.0`.
    self.to_out = None if pre_only else nnx.List([Linear(inner, dim, **kw)])
    if added_kv_proj_dim is not None:
      self.norm_added_q = RMSNorm(head_dim, eps=_NORM_EPS, param_dtype=param_dtype)
      self.norm_added_k = RMSNorm(head_dim, eps=_NORM_EPS, param_dtype=param_dtype)
      self.add_q_proj = Linear(added_kv_proj_dim, inner, **kw)
      self.add_k_proj = Linear(added_kv_proj_dim, inner, **kw)
      self.add_v_proj = Linear(added_kv_proj_dim, inner, **kw)
      self.to_add_out = Linear(inner, dim, **kw)
    self.joint = added_kv_proj_dim is not None

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None,
               rotary: tuple[jax.Array, jax.Array] | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention over hidden_states (B, S, D), or jointly over (text, image) for a double block.

    Args:
      hidden_states: (B, S, D) image tokens (double block) or the joint sequence (single block).
      encoder_hidden_states: (B, T, D) text tokens, double blocks only.
      rotary: (cos, sin), each (T + S, head_dim // 2) (or (S, ...) for a single block).

    Returns:
      Double block: (image output (B, S, D), text output (B, T, D)), each after its projection.
      Single block: the raw attention output (B, S, heads * head_dim).
    """
    q = self.norm_q(self._heads(self.to_q(hidden_states)))
    k = self.norm_k(self._heads(self.to_k(hidden_states)))
    v = self._heads(self.to_v(hidden_states))
    if self.joint:
      if encoder_hidden_states is None:
        raise ValueError("FluxAttention: joint attention needs encoder_hidden_states")
      eq = self.norm_added_q(self._heads(self.add_q_proj(encoder_hidden_states)))
      ek = self.norm_added_k(self._heads(self.add_k_proj(encoder_hidden_states)))
      ev = self._heads(self.add_v_proj(encoder_hidden_states))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((eq, q), (ek, k), (ev, v)))
    if rotary is not None:
      q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
    out = attention(q, k, v)
    out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
    if not self.joint:
      return out
    text_len = encoder_hidden_states.shape[1]
    return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class FluxTransformerBlock(nnx.Module):
  """Double-stream (MMDiT) block: separate weights for the image and text streams, joint attention.

  Each stream: AdaLN-Zero modulated attention and feed-forward, each gated, on a residual.
  """

  def __init__(self, config: FluxConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = config.inner_dim
    self.norm1 = AdaLayerNormZero(dim, 6, **kw)
    self.norm1_context = AdaLayerNormZero(dim, 6, **kw)
    self.attn = FluxAttention(dim, config.num_attention_heads, config.attention_head_dim,
                              added_kv_proj_dim=dim, **kw)
    self.norm2 = LayerNorm(dim, eps=_NORM_EPS, elementwise_affine=False)
    self.ff = FeedForward(dim, config.mlp_hidden_dim, **kw)
    self.norm2_context = LayerNorm(dim, eps=_NORM_EPS, elementwise_affine=False)
    self.ff_context = FeedForward(dim, config.mlp_hidden_dim, **kw)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array,
               rotary: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, jax.Array]:
    """One block on image tokens (B, S, D) and text tokens (B, T, D), conditioned on temb (B, D).

    `rotary` is `rope_frequencies` of `concat(txt_ids, img_ids)`. Returns
    `(encoder_hidden_states, hidden_states)`, in diffusers' order.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
    (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp,
     c_gate_mlp) = self.norm1_context(temb)
    attn_out, context_attn_out = self.attn(
        _modulate(self.norm1.norm(hidden_states), shift_msa, scale_msa),
        _modulate(self.norm1_context.norm(encoder_hidden_states), c_shift_msa, c_scale_msa),
        rotary)

    hidden_states = hidden_states + gate_msa[:, None] * attn_out
    ff_in = _modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
    hidden_states = hidden_states + gate_mlp[:, None] * self.ff(ff_in)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
    ff_in = _modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(ff_in)
    return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nnx.Module):
  """Single-stream block: shared weights over `concat(text, image)`, attention and MLP in parallel.

  `proj_out` (D + 4D -> D) projects the concatenation of the attention output and the MLP hidden
  state, as in diffusers; with `config.split_proj_out` it is two linears whose outputs are summed,
  `proj_out` (D -> D) on the attention output and `proj_out_mlp` (4D -> D) on the MLP hidden state
  (Nunchaku's `out_proj` and `mlp_fc2`).
  """

  def __init__(self, config: FluxConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = config.inner_dim
    self.norm = AdaLayerNormZero(dim, 3, **kw)
    self.proj_mlp = Linear(dim, config.mlp_hidden_dim, **kw)
    if config.split_proj_out:
      self.proj_out = Linear(dim, dim, **kw)
      self.proj_out_mlp = Linear(config.mlp_hidden_dim, dim, **kw)
    else:
      self.proj_out = Linear(dim + config.mlp_hidden_dim, dim, **kw)
      self.proj_out_mlp = None
    self.attn = FluxAttention(dim, config.num_attention_heads, config.attention_head_dim,
                              pre_only=True, **kw)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array,
               rotary: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, jax.Array]:
    """As `FluxTransformerBlock.__call__`: returns `(encoder_hidden_states, hidden_states)`."""
    text_len = encoder_hidden_states.shape[1]
    joint = jnp.concatenate([encoder_hidden_states, hidden_states], axis=1)
    shift, scale, gate = self.norm(temb)
    normed = _modulate(self.norm.norm(joint), shift, scale)
    mlp = jax.nn.gelu(self.proj_mlp(normed), approximate=True)
    attn_out = self.attn(normed, rotary=rotary)
    if self.proj_out_mlp is None:
      out = self.proj_out(jnp.concatenate([attn_out, mlp], axis=-1))
    else:
      out = self.proj_out(attn_out) + self.proj_out_mlp(mlp)
    joint = joint + gate[:, None] * out
    return joint[:, :text_len], joint[:, text_len:]


class FluxTransformer(nnx.Module):
  """FLUX.1 transformer: diffusers' `FluxTransformer2DModel` in Flax NNX.

  Args:
    config: the hyperparameters (`FluxConfig.dev()`, `FluxConfig.schnell()`, or a custom one).
    dtype: computation dtype (None: the dtype of `hidden_states`).
    param_dtype: dtype of freshly initialized parameters.
    rngs: initialization randomness (use `nnx.eval_shape` to build without allocating).
  """

  def __init__(self, config: FluxConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = config.inner_dim
    self.config = config
    self.dtype = dtype
    self.time_text_embed = TimestepGuidanceTextEmbedding(config, **kw)
    self.context_embedder = Linear(config.joint_attention_dim, dim, **kw)
    self.x_embedder = Linear(config.in_channels, dim, **kw)
    self.transformer_blocks = nnx.List(
        [FluxTransformerBlock(config, **kw) for _ in range(config.num_layers)])
    self.single_transformer_blocks = nnx.List(
        [FluxSingleTransformerBlock(config, **kw) for _ in range(config.num_single_layers)])
    self.norm_out = AdaLayerNormContinuous(dim, **kw)
    self.proj_out = Linear(dim, config.proj_out_dim, **kw)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: jnp.dtype | None = None
                      ) -> FluxTransformer:
    """Loads a diffusers `FluxTransformer2DModel` folder (or a svdq-jax checkpoint of one).

    `dtype` (e.g. `jnp.bfloat16`) is both the computation dtype and the dtype floating parameters
    are cast to; None: float32 parameters, computation in the input's dtype (a svdq-jax checkpoint
    keeps its stored dtypes).
    """
    return load_pretrained(path, "flux", dtype=dtype)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, timestep: jax.Array, img_ids: jax.Array,
               txt_ids: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    """Predicts the flow-matching velocity of packed latents.

    Args:
      hidden_states: (B, S, in_channels) packed image latents (2x2 patches of the 16-channel VAE
        latent for FLUX.1, so in_channels = 64).
      encoder_hidden_states: (B, T, joint_attention_dim) T5 features.
      pooled_projections: (B, pooled_projection_dim) pooled CLIP features.
      timestep: (B,) in [0, 1] (sigma); multiplied by 1000 as in diffusers (in the computation
        dtype, so rounded to it).
      img_ids: (S, len(axes_dims_rope)) image position ids.
      txt_ids: (T, len(axes_dims_rope)) text position ids (zeros for FLUX.1).
      guidance: (B,) guidance scale for guidance-distilled models (dev), multiplied by 1000;
        None for schnell.

    Returns:
      (B, S, patch_size**2 * out_channels) in the computation dtype.
    """
    hidden_states, encoder_hidden_states, temb, rotary = self.embed(
        hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
        guidance)
    for block in self.transformer_blocks:
      encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb,
                                                   rotary)
    for block in self.single_transformer_blocks:
      encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb,
                                                   rotary)
    return self.output(hidden_states, temb)

  def embed(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
            pooled_projections: jax.Array, timestep: jax.Array, img_ids: jax.Array,
            txt_ids: jax.Array, guidance: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """What enters the first block, from `__call__`'s arguments (same meanings).

    Returns:
      (hidden_states (B, S, D), encoder_hidden_states (B, T, D), temb (B, D), rotary (cos, sin)
      each (T + S, head_dim // 2) float32), in the computation dtype. Streamed quantization
      (`pipelines.quantize_stream`) caches these and runs the blocks one at a time.
    """
    config = self.config
    if (guidance is None) == config.guidance_embeds:
      raise ValueError("FluxTransformer: guidance is required when config.guidance_embeds is "
                       f"True and must be None otherwise (guidance_embeds={config.guidance_embeds},"
                       f" got guidance={'None' if guidance is None else guidance.shape})")
    n_axes = len(config.axes_dims_rope)
    for name, ids, length in (("img_ids", img_ids, hidden_states.shape[1]),
                              ("txt_ids", txt_ids, encoder_hidden_states.shape[1])):
      if ids.shape != (length, n_axes):
        raise ValueError(f"FluxTransformer: {name} must be ({length}, {n_axes}) for this input, "
                         f"got {ids.shape}")
    dtype = self.dtype if self.dtype is not None else hidden_states.dtype
    hidden_states = self.x_embedder(hidden_states.astype(dtype))
    encoder_hidden_states = self.context_embedder(encoder_hidden_states.astype(dtype))
    timestep = _scaled_in(timestep, dtype)
    if guidance is not None:
      guidance = _scaled_in(guidance, dtype)
    temb = self.time_text_embed(timestep, guidance, pooled_projections.astype(dtype))
    rotary = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=0),
                              config.axes_dims_rope, config.rope_theta)
    return hidden_states, encoder_hidden_states, temb, rotary

  def output(self, hidden_states: jax.Array, temb: jax.Array) -> jax.Array:
    """The velocity (B, S, patch_size**2 * out_channels) from the last block's image tokens
    (B, S, D) and temb (B, D): the final AdaLN norm and projection."""
    return self.proj_out(self.norm_out(hidden_states, temb))

