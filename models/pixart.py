"""The PixArt-Sigma diffusion transformer in Flax NNX, numerically matching diffusers.

Structure (diffusers `PixArtTransformer2DModel` with `norm_type="ada_norm_single"`): a patch
embedding with a resolution-dependent 2-D sin-cos position embedding, adaLN-single (one timestep
embedder and one linear to 6*D shared by all blocks, each block adding its own learned
`scale_shift_table`), a caption projection of the T5 features, `num_layers` blocks of
self-attention, cross-attention to the captions and a GELU(tanh) MLP, and a final modulated
LayerNorm, projection and unpatchify.

Parameter paths follow the diffusers keys (`transformer_blocks/0/attn1/to_q/kernel` for
`transformer_blocks.0.attn1.to_q.weight`), so `convert.pixart` maps one to the other by name.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (
  Attention,
  Conv2d,
  FeedForward,
  LayerNorm,
  Linear,
  MLPEmbedder,
  timestep_embedding,
)
from models.pretrained import load_pretrained
from svdq_jax.config_base import DictConfig

_TIMESTEP_CHANNELS = 256


@dataclasses.dataclass(frozen=True)
class PixArtConfig(DictConfig):
  """Hyper-parameters of a PixArt-Sigma transformer (defaults: PixArt-Sigma-XL-2-1024-MS).

  `interpolation_scale` scales the position grid of the sin-cos embedding (the original models
  use 0.5 / 1 / 2 / 4 at 256 / 512 / 1024 / 2048 pixels). `caption_channels=None` feeds the
  encoder features to the cross-attention without a caption projection (their width must then be
  `cross_attention_dim`).
  """

  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: int = 8
  num_layers: int = 28
  cross_attention_dim: int = 1152
  caption_channels: int | None = 4096
  sample_size: int = 128
  patch_size: int = 2
  interpolation_scale: float = 2.0
  attention_bias: bool = True
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.sample_size % self.patch_size:
      raise ValueError(f"PixArtConfig: sample_size {self.sample_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
      raise ValueError(
          f"PixArtConfig: the caption projection outputs inner_dim {self.inner_dim} "
          f"(= {self.num_attention_heads} heads x {self.attention_head_dim}), but "
          f"cross_attention_dim is {self.cross_attention_dim}; they must be equal")

  @property
  def inner_dim(self) -> int:
    """Model width D = heads x head_dim."""
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def sigma(cls, resolution: int = 1024) -> PixArtConfig:
    """PixArt-Sigma-XL-2 at `resolution` pixels (256, 512, 1024 or 2048)."""
    scales = {256: 0.5, 512: 1.0, 1024: 2.0, 2048: 4.0}
    if resolution not in scales:
      raise ValueError(f"PixArtConfig.sigma: resolution {resolution} is not one of "
                       f"{sorted(scales)}")
    return cls(sample_size=resolution // 8, interpolation_scale=scales[resolution])

  @classmethod
  def sigma_256(cls) -> PixArtConfig:
    """PixArt-Sigma-XL-2-256x256 (latent 32x32)."""
    return cls.sigma(256)

  @classmethod
  def sigma_512(cls) -> PixArtConfig:
    """PixArt-Sigma-XL-2-512-MS (latent 64x64)."""
    return cls.sigma(512)

  @classmethod
  def sigma_1024(cls) -> PixArtConfig:
    """PixArt-Sigma-XL-2-1024-MS (latent 128x128)."""
    return cls.sigma(1024)

  @classmethod
  def sigma_2k(cls) -> PixArtConfig:
    """PixArt-Sigma-XL-2-2K-MS (latent 256x256)."""
    return cls.sigma(2048)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, *, base_size: int,
                        interpolation_scale: float) -> jax.Array:
  """The 2-D sin-cos position embedding of a (grid_h, grid_w) patch grid, (grid_h*grid_w, D) f32.

  Tokens run row-major over (h, w). Positions are `arange(n) / (n / base_size) /
  interpolation_scale` per axis, frequencies `10000 ** (-k / (D/4))`; the first D/2 channels
  encode the column (w) position and the last D/2 the row (h) position, each as [sin | cos].
  Computed in the graph in float32 (diffusers uses float64 for the angles: the two differ by
  about 1e-6), so a jitted model carries no (tokens, D) constant.
  """
  if embed_dim % 4:
    raise ValueError(f"sincos_pos_embed_2d: embed_dim {embed_dim} must be a multiple of 4")
  quarter = embed_dim // 4
  omega = jnp.asarray(1.0 / 10000.0 ** (np.arange(quarter) / quarter), jnp.float32)

  def sincos(n: int) -> jax.Array:
    pos = jnp.arange(n, dtype=jnp.float32) / (n / base_size) / interpolation_scale
    angles = pos[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)

  cols = jnp.broadcast_to(sincos(grid_w)[None], (grid_h, grid_w, 2 * quarter))
  rows = jnp.broadcast_to(sincos(grid_h)[:, None], (grid_h, grid_w, 2 * quarter))
  return jnp.concatenate([cols, rows], axis=-1).reshape(grid_h * grid_w, embed_dim)


class PatchEmbed(nnx.Module):
  """Patchify conv (stride = patch) plus the sin-cos position embedding of the patch grid."""

  def __init__(self, config: PixArtConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.patch_size = config.patch_size
    self.base_size = config.sample_size // config.patch_size
    self.interpolation_scale = config.interpolation_scale
    self.embed_dim = config.inner_dim
    self.proj = Conv2d(config.in_channels, config.inner_dim, config.patch_size,
                       stride=config.patch_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, latent_nhwc: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, D) tokens, row-major over the patch grid."""
    tokens = self.proj(latent_nhwc)
    b, gh, gw, d = tokens.shape
    pos = sincos_pos_embed_2d(self.embed_dim, gh, gw, base_size=self.base_size,
                              interpolation_scale=self.interpolation_scale)
    tokens = tokens.reshape(b, gh * gw, d)
    return (tokens.astype(jnp.float32) + pos[None]).astype(tokens.dtype)


class CombinedTimestepEmbeddings(nnx.Module):
  """diffusers' `PixArtAlphaCombinedTimestepSizeEmbeddings` without the size conditions."""

  def __init__(self, dim: int, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.timestep_embedder = MLPEmbedder(_TIMESTEP_CHANNELS, dim, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)

  def __call__(self, timestep: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(B,) timesteps (any numeric dtype, e.g. 0..999) -> (B, D) in `dtype`."""
    proj = timestep_embedding(timestep, _TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                              downscale_freq_shift=0.0)
    return self.timestep_embedder(proj.astype(dtype))


class AdaLayerNormSingle(nnx.Module):
  """adaLN-single: the timestep embedding and its 6*D modulation shared by all blocks."""

  def __init__(self, dim: int, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.emb = CombinedTimestepEmbeddings(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear = Linear(dim, 6 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, timestep: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Returns (modulation (B, 6D), embedded_timestep (B, D))."""
    embedded = self.emb(timestep, dtype)
    return self.linear(jax.nn.silu(embedded)), embedded


class PixArtBlock(nnx.Module):
  """diffusers' `BasicTransformerBlock` with `norm_type="ada_norm_single"`.

  x += gate_msa * attn1(norm1(x) * (1 + scale_msa) + shift_msa)
  x += attn2(x, captions)                       (no norm before the cross-attention)
  x += gate_mlp * ff(norm2(x) * (1 + scale_mlp) + shift_mlp)
  with the six (B, 1, D) modulations = `scale_shift_table` (6, D) + the shared adaLN output.
  """

  def __init__(self, config: PixArtConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    dim = config.inner_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm_kw = dict(eps=config.norm_eps, elementwise_affine=config.norm_elementwise_affine,
                   param_dtype=param_dtype)
    self.norm1 = LayerNorm(dim, **norm_kw)
    self.attn1 = Attention(dim, config.num_attention_heads, config.attention_head_dim,
                           use_bias=config.attention_bias, **kw)
    self.norm2 = LayerNorm(dim, **norm_kw)
    self.attn2 = Attention(dim, config.num_attention_heads, config.attention_head_dim,
                           kv_dim=config.cross_attention_dim, use_bias=config.attention_bias, **kw)
    self.ff = FeedForward(dim, 4 * dim, **kw)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (6, dim), param_dtype) / dim**0.5)

  def __call__(self, x: jax.Array, captions: jax.Array, modulation: jax.Array,
               caption_mask: jax.Array | None) -> jax.Array:
    """x (B, N, D); captions (B, T, Dc); modulation (B, 6D); caption_mask (B, 1, 1, T) or None."""
    b, _, d = x.shape
    mods = self.scale_shift_table[...].astype(x.dtype)[None] + modulation.reshape(b, 6, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=1)
    h = self.norm1(x) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * self.attn1(h)
    x = x + self.attn2(x, captions, mask=caption_mask)
    h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * self.ff(h)


class PixArtSigmaTransformer(nnx.Module):
  """The PixArt-Sigma DiT (diffusers `PixArtTransformer2DModel`, adaLN-single, no size conds).

  Inputs and output are NCHW like diffusers; the patch embedding runs on NHWC internally.
  `dtype` is the compute dtype (default: that of `hidden_states`); `param_dtype` that of the
  parameters.
  """

  def __init__(self, config: PixArtConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    dim = config.inner_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = PatchEmbed(config, **kw)
    self.transformer_blocks = nnx.List([PixArtBlock(config, **kw)
                                        for _ in range(config.num_layers)])
    self.norm_out = LayerNorm(dim, eps=1e-6, elementwise_affine=False)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (2, dim), param_dtype) / dim**0.5)
    self.proj_out = Linear(dim, config.patch_size**2 * config.out_channels, **kw)
    self.adaln_single = AdaLayerNormSingle(dim, **kw)
    self.caption_projection = (MLPEmbedder(config.caption_channels, dim, act="gelu_tanh", **kw)
                               if config.caption_channels is not None else None)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
               timestep: jax.Array, encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """Predicts the noise (and variance) channels for a batch of latents.

    Args:
      hidden_states: latents (B, in_channels, H, W), H and W multiples of `patch_size`.
      encoder_hidden_states: T5 features (B, T, caption_channels).
      timestep: (B,) or scalar diffusion timesteps (0..999 for the released models).
      encoder_attention_mask: (B, T), nonzero/True for the caption tokens to attend to, or None.

    Returns:
      (B, out_channels, H, W) in the compute dtype.
    """
    cfg = self.config
    p = cfg.patch_size
    if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
      raise ValueError(f"PixArtSigmaTransformer: hidden_states must be (B, {cfg.in_channels}, H, "
                       f"W), got {hidden_states.shape}")
    b, _, height, width = hidden_states.shape
    if height % p or width % p:
      raise ValueError(f"PixArtSigmaTransformer: H, W = {height}, {width} must be multiples of "
                       f"patch_size {p}")
    expected_caption = cfg.caption_channels or cfg.cross_attention_dim
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b \
        or encoder_hidden_states.shape[2] != expected_caption:
      raise ValueError(f"PixArtSigmaTransformer: encoder_hidden_states must be (B={b}, T, "
                       f"{expected_caption}), got {encoder_hidden_states.shape}")
    dtype = self.dtype if self.dtype is not None else hidden_states.dtype
    x = self.pos_embed(hidden_states.astype(dtype).transpose(0, 2, 3, 1))
    timestep = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
    modulation, embedded_timestep = self.adaln_single(timestep, dtype)
    captions = encoder_hidden_states.astype(dtype)
    if self.caption_projection is not None:
      captions = self.caption_projection(captions)
    caption_mask = None
    if encoder_attention_mask is not None:
      if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
        raise ValueError(f"PixArtSigmaTransformer: encoder_attention_mask must be (B, T) = "
                         f"{encoder_hidden_states.shape[:2]}, got {encoder_attention_mask.shape}")
      caption_mask = encoder_attention_mask.astype(bool)[:, None, None, :]
    for block in self.transformer_blocks:
      x = block(x, captions, modulation, caption_mask)
    shift, scale = jnp.split(
        self.scale_shift_table[...].astype(x.dtype)[None] + embedded_timestep[:, None], 2, axis=1)
    x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
    gh, gw = height // p, width // p
    x = x.reshape(b, gh, gw, p, p, cfg.out_channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, cfg.out_channels, height, width)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike,
                      dtype: jnp.dtype | None = None) -> PixArtSigmaTransformer:
    """Loads a diffusers `PixArtTransformer2DModel` folder (or one of ours) without torch.

    `dtype` (e.g. `jnp.bfloat16`) is both the computation dtype and the dtype floating parameters
    are cast to; None: float32 parameters, computation in the input's dtype (a svdq-jax checkpoint
    keeps its stored dtypes).
    """
    return load_pretrained(path, "pixart", dtype=dtype)
