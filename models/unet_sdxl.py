"""The Stable Diffusion UNet (SDXL, SDXL-Turbo, SD 1.x, SD 2.x) in Flax NNX, matching diffusers.

diffusers' `UNet2DConditionModel` for the configurations the Stable Diffusion releases use:
`conv_in`; down blocks of ResNet blocks (`DownBlock2D`) or ResNet blocks each followed by a
`Transformer2DModel` (`CrossAttnDownBlock2D`), with a stride-2 conv between resolutions; the
`UNetMidBlock2DCrossAttn` mid block; up blocks that concatenate the skip connections; GroupNorm,
SiLU and `conv_out`. The transformer blocks are diffusers' `BasicTransformerBlock`: LayerNorm,
self-attention, LayerNorm, cross-attention on the text features, LayerNorm, GEGLU feed-forward,
each on a residual, between a GroupNorm plus `proj_in` and a `proj_out` (Linear layers with
`use_linear_projection`, SD 2.x and SDXL; 1x1 convs otherwise, SD 1.x). The timestep embedding
(sinusoidal, then a SiLU MLP) conditions every ResNet block; SDXL adds to it the "text_time"
embedding of the pooled text features and the six micro-conditioning ids (original size, crop
coordinates, target size).

Configurations covered (`UNetSDXLConfig`): SDXL base and SDXL-Turbo (`sdxl()`, `sdxl_turbo()`),
the SDXL refiner's layout (any number of time ids), SD 1.x (`sd15()`) and SD 2.x (`sd2()`).
Not covered (a ValueError from the config, a CheckpointError from the converter): class
embeddings, other addition embeddings (image, text_image), `time_cond_proj_dim` (LCM), ControlNet
residuals, the simple-cross-attention mid block and attention masks on the text.

Parameter paths spell the diffusers keys (`down_blocks/1/attentions/0/transformer_blocks/0/attn1/
to_q/kernel` holds `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`,
transposed). `__call__` takes and returns NCHW like diffusers; the layers run on NHWC.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (
  Attention,
  Conv2d,
  FeedForward,
  GroupNorm,
  LayerNorm,
  Linear,
  MLPEmbedder,
  timestep_embedding,
)
from models.pretrained import load_pretrained
from models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from svdq_jax.config_base import DictConfig

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
ADDITION_EMBED_TYPES = ("text_time", None)
_TRANSFORMER_NORM_EPS = 1e-6  # the GroupNorm before proj_in (diffusers' Transformer2DModel)
_BLOCK_NORM_EPS = 1e-5  # the LayerNorms of BasicTransformerBlock


def _per_block(name: str, value: int | tuple | list, count: int) -> tuple[int, ...]:
  """An int, or one int per block, as a tuple of `count` ints."""
  values = (value,) * count if isinstance(value, int) else tuple(value)
  if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                     for v in values):
    raise ValueError(f"UNetSDXLConfig.{name} must be a positive integer or one per block "
                     f"({count}), got {value!r}")
  return values


@dataclasses.dataclass(frozen=True)
class UNetSDXLConfig(DictConfig):
  """Hyper-parameters of a UNet2DConditionModel, named as in diffusers' config.json.

  Defaults are SDXL base's. As in diffusers, `attention_head_dim` is the number of attention
  heads of each block (the head width is the block's channels divided by it);
  `layers_per_block`, `transformer_layers_per_block` and `attention_head_dim` are one int per
  down block (an int in config.json applies to every block). `transformer_layers_per_block[-1]`
  is the mid block's depth. `addition_embed_type` "text_time" (SDXL) adds the embedding of
  `text_embeds` (B, P) and `time_ids` (B, n) to the timestep embedding:
  `projection_class_embeddings_input_dim` = P + n * `addition_time_embed_dim`.
  """

  sample_size: int | None = 128
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D")
  up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  block_out_channels: tuple[int, ...] = (320, 640, 1280)
  layers_per_block: tuple[int, ...] | int = 2
  transformer_layers_per_block: tuple[int, ...] | int = (1, 2, 10)
  attention_head_dim: tuple[int, ...] | int = (5, 10, 20)
  cross_attention_dim: int = 2048
  use_linear_projection: bool = True
  addition_embed_type: str | None = "text_time"
  addition_time_embed_dim: int | None = 256
  projection_class_embeddings_input_dim: int | None = 2816
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if n == 0:
      raise ValueError("UNetSDXLConfig: block_out_channels is empty")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNetSDXLConfig: {n} block_out_channels need {n} down_block_types and "
                       f"up_block_types, got {len(self.down_block_types)} and "
                       f"{len(self.up_block_types)}")
    for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      object.__setattr__(self, name, _per_block(name, getattr(self, name), n))
    for name, types, known in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                               ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
      bad = [t for t in types if t not in known]
      if bad:
        raise ValueError(f"UNetSDXLConfig.{name}: {bad} not supported (known: {list(known)})")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"UNetSDXLConfig.mid_block_type {self.mid_block_type!r} is not supported "
                       f"(known: {list(MID_BLOCK_TYPES)})")
    if self.addition_embed_type not in ADDITION_EMBED_TYPES:
      raise ValueError(f"UNetSDXLConfig.addition_embed_type {self.addition_embed_type!r} is not "
                       f"supported (known: {list(ADDITION_EMBED_TYPES)})")
    if self.addition_embed_type == "text_time" and not (
        self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
      raise ValueError("UNetSDXLConfig: addition_embed_type 'text_time' needs "
                       "addition_time_embed_dim and projection_class_embeddings_input_dim")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"UNetSDXLConfig: block_out_channels {bad} not divisible by "
                       f"norm_num_groups {self.norm_num_groups}")
    bad = [(c, h) for c, h in zip(self.block_out_channels, self.attention_head_dim, strict=True)
           if c % h]
    if bad:
      raise ValueError(f"UNetSDXLConfig: (channels, heads) {bad}: channels not divisible by the "
                       "number of heads (attention_head_dim)")
    for name in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
      if name == "sample_size" and self.sample_size is None:
        continue
      if getattr(self, name) < 1:
        raise ValueError(f"UNetSDXLConfig.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def time_embed_dim(self) -> int:
    """Width of the timestep embedding every ResNet block reads: 4 x block_out_channels[0]."""
    return 4 * self.block_out_channels[0]

  @property
  def downsample_factor(self) -> int:
    """How much the latent shrinks at the deepest level: 2 ** (number of downsamplers)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def sdxl(cls) -> UNetSDXLConfig:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet (2.57 B parameters, 1024x1024 images)."""
    return cls()

  @classmethod
  def sdxl_turbo(cls) -> UNetSDXLConfig:
    """stabilityai/sdxl-turbo's UNet: SDXL's layers, trained for 512x512 (sample_size 64)."""
    return cls(sample_size=64)

  @classmethod
  def sd15(cls) -> UNetSDXLConfig:
    """Stable Diffusion 1.x: four levels, 8 heads everywhere, 1x1-conv projections, CLIP ViT-L."""
    return cls(sample_size=64,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               block_out_channels=(320, 640, 1280, 1280), transformer_layers_per_block=1,
               attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False,
               addition_embed_type=None, addition_time_embed_dim=None,
               projection_class_embeddings_input_dim=None)

  @classmethod
  def sd2(cls) -> UNetSDXLConfig:
    """Stable Diffusion 2.x: as 1.x with 64-wide heads, linear projections, OpenCLIP ViT-H."""
    return dataclasses.replace(cls.sd15(), sample_size=96, attention_head_dim=(5, 10, 20, 20),
                               cross_attention_dim=1024, use_linear_projection=True)


class BasicTransformerBlock(nnx.Module):
  """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-LayerNorm residuals."""

  def __init__(self, dim: int, heads: int, cross_attention_dim: int, *,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    head_dim = dim // heads
    self.norm1 = LayerNorm(dim, eps=_BLOCK_NORM_EPS, param_dtype=param_dtype)
    self.attn1 = Attention(dim, heads, head_dim, use_bias=False, **kw)
    self.norm2 = LayerNorm(dim, eps=_BLOCK_NORM_EPS, param_dtype=param_dtype)
    self.attn2 = Attention(dim, heads, head_dim, kv_dim=cross_attention_dim, use_bias=False, **kw)
    self.norm3 = LayerNorm(dim, eps=_BLOCK_NORM_EPS, param_dtype=param_dtype)
    self.ff = FeedForward(dim, 4 * dim, activation_fn="geglu", **kw)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x (B, S, dim) image tokens; context (B, T, cross_attention_dim) text features."""
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context.astype(x.dtype))
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm, `proj_in`, `depth` transformer blocks on the H*W tokens, `proj_out`, + input.

  `proj_in` / `proj_out` are Linear layers (`linear_projection`) or 1x1 convs. (N, H, W, C) ->
  (N, H, W, C).
  """

  def __init__(self, channels: int, heads: int, depth: int, cross_attention_dim: int,
               groups: int, *, linear_projection: bool, dtype: jnp.dtype | None,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_projection = linear_projection
    self.norm = GroupNorm(groups, channels, eps=_TRANSFORMER_NORM_EPS, param_dtype=param_dtype)
    projection = (lambda: Linear(channels, channels, **kw)) if linear_projection else (
        lambda: Conv2d(channels, channels, 1, **kw))
    self.proj_in = projection()
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, cross_attention_dim, **kw) for _ in range(depth)])
    self.proj_out = projection()

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.norm(x)
    if self.linear_projection:
      tokens = self.proj_in(tokens.reshape(b, h * w, c))
    else:
      tokens = self.proj_in(tokens).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      tokens = block(tokens, context)
    if self.linear_projection:
      out = self.proj_out(tokens).reshape(b, h, w, c)
    else:
      out = self.proj_out(tokens.reshape(b, h, w, c))
    return out + x


def _transformer(config: UNetSDXLConfig, channels: int, heads: int, depth: int,
                 **kw) -> Transformer2DModel:
  return Transformer2DModel(channels, heads, depth, config.cross_attention_dim,
                            config.norm_num_groups,
                            linear_projection=config.use_linear_projection, **kw)


class DownBlock2D(nnx.Module):
  """`num_layers` ResNet blocks, each followed by a transformer in a `CrossAttnDownBlock2D`
  (`attentions` None in a `DownBlock2D`), then an optional stride-2 `Downsample2D`."""

  def __init__(self, config: UNetSDXLConfig, index: int, in_channels: int, *,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    out_channels = config.block_out_channels[index]
    num_layers = config.layers_per_block[index]
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                      config.norm_num_groups, temb_channels=config.time_embed_dim,
                      eps=config.norm_eps, **kw)
        for i in range(num_layers)])
    cross = config.down_block_types[index] == "CrossAttnDownBlock2D"
    self.attentions = nnx.List([
        _transformer(config, out_channels, config.attention_head_dim[index],
                     config.transformer_layers_per_block[index], **kw)
        for _ in range(num_layers)]) if cross else None
    last = index == len(config.block_out_channels) - 1
    self.downsamplers = None if last else nnx.List([
        Downsample2D(out_channels, padding=config.downsample_padding, **kw)])

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array
               ) -> tuple[jax.Array, list[jax.Array]]:
    """Returns the output and the skip states (one per layer, and the downsampled output)."""
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UpBlock2D(nnx.Module):
  """`layers_per_block + 1` ResNet blocks on (state, skip) concatenations, each followed by a
  transformer in a `CrossAttnUpBlock2D`, then an optional nearest-2x `Upsample2D`."""

  def __init__(self, config: UNetSDXLConfig, index: int, *, dtype: jnp.dtype | None,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = tuple(reversed(config.block_out_channels))
    n = len(channels)
    out_channels = channels[index]
    prev_channels = channels[max(index - 1, 0)]
    skip_in = channels[min(index + 1, n - 1)]
    num_layers = tuple(reversed(config.layers_per_block))[index] + 1
    self.resnets = nnx.List([
        ResnetBlock2D((prev_channels if i == 0 else out_channels)
                      + (skip_in if i == num_layers - 1 else out_channels), out_channels,
                      config.norm_num_groups, temb_channels=config.time_embed_dim,
                      eps=config.norm_eps, **kw)
        for i in range(num_layers)])
    cross = config.up_block_types[index] == "CrossAttnUpBlock2D"
    heads = tuple(reversed(config.attention_head_dim))[index]
    depth = tuple(reversed(config.transformer_layers_per_block))[index]
    self.attentions = nnx.List([
        _transformer(config, out_channels, heads, depth, **kw)
        for _ in range(num_layers)]) if cross else None
    self.upsamplers = None if index == n - 1 else nnx.List([Upsample2D(out_channels, **kw)])

  def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array,
               context: jax.Array) -> jax.Array:
    """`skips`: this block's skip states, in the order the down path produced them."""
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlock2DCrossAttn(nnx.Module):
  """ResNet, transformer (depth `transformer_layers_per_block[-1]`), ResNet."""

  def __init__(self, config: UNetSDXLConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = config.block_out_channels[-1]
    self.attentions = nnx.List([_transformer(config, channels, config.attention_head_dim[-1],
                                             config.transformer_layers_per_block[-1], **kw)])
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, config.norm_num_groups,
                      temb_channels=config.time_embed_dim, eps=config.norm_eps, **kw)
        for _ in range(2)])

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    x = self.resnets[0](x, temb)
    return self.resnets[1](self.attentions[0](x, context), temb)


class UNetSDXL(nnx.Module):
  """diffusers' `UNet2DConditionModel` (SDXL, SD 1.x / 2.x configurations) in Flax NNX.

  Args:
    config: `UNetSDXLConfig.sdxl()` etc., or one read from a diffusers config.json.
    dtype: computation dtype (None: the dtype of `sample`).
    param_dtype: dtype of freshly initialized parameters.
    rngs: initialization randomness (use `nnx.eval_shape` to build without allocating).
  """

  def __init__(self, config: UNetSDXLConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.dtype = dtype
    channels = config.block_out_channels
    self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, **kw)
    self.time_embedding = MLPEmbedder(channels[0], config.time_embed_dim, **kw)
    self.add_embedding = (
        MLPEmbedder(config.projection_class_embeddings_input_dim, config.time_embed_dim, **kw)
        if config.addition_embed_type == "text_time" else None)
    self.down_blocks = nnx.List([
        DownBlock2D(config, i, channels[max(i - 1, 0)], **kw) for i in range(len(channels))])
    self.mid_block = (UNetMidBlock2DCrossAttn(config, **kw)
                      if config.mid_block_type is not None else None)
    self.up_blocks = nnx.List([UpBlock2D(config, i, **kw) for i in range(len(channels))])
    self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps,
                                   param_dtype=param_dtype)
    self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1, **kw)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: jnp.dtype | None = None) -> UNetSDXL:
    """Loads a diffusers `UNet2DConditionModel` folder (or a svdq-jax checkpoint of one).

    `dtype` (e.g. `jnp.bfloat16`) is both the computation dtype and the dtype floating parameters
    are cast to; None: float32 parameters, computation in the input's dtype (a svdq-jax checkpoint
    keeps its stored dtypes).
    """
    return load_pretrained(path, "unet", dtype=dtype)

  def _sinusoidal(self, t: jax.Array, dim: int) -> jax.Array:
    return timestep_embedding(t, dim, flip_sin_to_cos=self.config.flip_sin_to_cos,
                              downscale_freq_shift=self.config.freq_shift)

  def embed_time(self, timestep: jax.Array, batch: int, dtype: jnp.dtype,
                 added_cond_kwargs: Mapping[str, jax.Array] | None) -> jax.Array:
    """The conditioning vector (B, time_embed_dim): timestep embedding (+ "text_time")."""
    config = self.config
    timesteps = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
    emb = self.time_embedding(self._sinusoidal(timesteps, config.block_out_channels[0])
                              .astype(dtype))
    if self.add_embedding is None:
      return emb
    if not added_cond_kwargs or {"text_embeds", "time_ids"} - set(added_cond_kwargs):
      raise ValueError("UNetSDXL: addition_embed_type 'text_time' needs added_cond_kwargs with "
                       "'text_embeds' (B, P) and 'time_ids' (B, n)")
    text_embeds = added_cond_kwargs["text_embeds"]
    time_ids = added_cond_kwargs["time_ids"]
    width = text_embeds.shape[-1] + time_ids.shape[-1] * config.addition_time_embed_dim
    if (text_embeds.shape[0] != batch or time_ids.shape[0] != batch
        or width != config.projection_class_embeddings_input_dim):
      raise ValueError(
          f"UNetSDXL: text_embeds {text_embeds.shape} and time_ids {time_ids.shape} must have "
          f"batch {batch} and give P + n * {config.addition_time_embed_dim} = "
          f"{config.projection_class_embeddings_input_dim} features")
    time_embeds = self._sinusoidal(time_ids.reshape(-1), config.addition_time_embed_dim)
    add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32),
                                  time_embeds.reshape(batch, -1)], axis=-1)
    return emb + self.add_embedding(add_embeds.astype(dtype))

  def __call__(self, sample: jax.Array, timestep: jax.Array | float,
               encoder_hidden_states: jax.Array,
               added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Predicts the noise (or v) of latents.

    Args:
      sample: (B, in_channels, H, W) latents; H and W multiples of `config.downsample_factor`.
      timestep: a scalar or (B,) training timestep (0..999).
      encoder_hidden_states: (B, T, cross_attention_dim) text features.
      added_cond_kwargs: for "text_time" (SDXL): {"text_embeds": (B, P) pooled text projection,
        "time_ids": (B, n) micro-conditioning}; otherwise unused.

    Returns:
      (B, out_channels, H, W) in the computation dtype.
    """
    config = self.config
    factor = config.downsample_factor
    if (sample.ndim != 4 or sample.shape[1] != config.in_channels or sample.shape[2] % factor
        or sample.shape[3] % factor):
      raise ValueError(f"UNetSDXL: sample must be (B, {config.in_channels}, H, W) with H, W "
                       f"multiples of {factor}, got {sample.shape}")
    if encoder_hidden_states.ndim != 3 or (
        encoder_hidden_states.shape[-1] != config.cross_attention_dim):
      raise ValueError(f"UNetSDXL: encoder_hidden_states must be (B, T, "
                       f"{config.cross_attention_dim}), got {encoder_hidden_states.shape}")
    dtype = self.dtype if self.dtype is not None else sample.dtype
    batch = sample.shape[0]
    temb = self.embed_time(timestep, batch, dtype, added_cond_kwargs)
    context = encoder_hidden_states.astype(dtype)
    x = self.conv_in(sample.astype(dtype).transpose(0, 2, 3, 1))
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context)
      skips.extend(block_skips)
    if self.mid_block is not None:
      x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      count = len(block.resnets)
      x = block(x, skips[-count:], temb, context)
      del skips[-count:]
    x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
    return x.transpose(0, 3, 1, 2)
