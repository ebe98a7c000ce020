"""AutoencoderKL (the SD / SDXL / PixArt 4-channel VAE and the FLUX 16-channel VAE) in Flax NNX.

Matches diffusers' `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks, SiLU,
GroupNorm, a mid block of ResNet, single-head spatial self-attention, ResNet, and the optional
1x1 `quant_conv` / `post_quant_conv`. Public methods take and return NCHW like diffusers; the
layers run on NHWC. Parameter paths spell the diffusers keys
(`encoder/down_blocks/0/resnets/0/conv1/kernel` for `encoder.down_blocks.0.resnets.0.conv1.weight`).

`encode` / `decode` work on raw latents as diffusers' do; pipelines scale them with
`scale_latents` / `unscale_latents` (`(z - shift_factor) * scaling_factor` and back).
"""

from __future__ import annotations

import dataclasses
import os

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Attention, Conv2d, GroupNorm
from models.pretrained import load_pretrained
from models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from svdq_jax.config_base import DictConfig

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig(DictConfig):
  """Hyper-parameters of an AutoencoderKL (defaults: the SD 1.x / 2.x VAE).

  `latents_mean` / `latents_std` are carried for pipelines that normalise per channel (diffusers
  stores them in the VAE config); the model itself does not use them.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    for name in ("block_out_channels", "latents_mean", "latents_std"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    if not self.block_out_channels:
      raise ValueError("VAEConfig: block_out_channels is empty")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig: block_out_channels {bad} not divisible by norm_num_groups "
                       f"{self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side (8 for the released VAEs)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def sd(cls) -> VAEConfig:
    """The Stable Diffusion 1.x / 2.x VAE (scaling 0.18215)."""
    return cls()

  @classmethod
  def sdxl(cls) -> VAEConfig:
    """The SDXL VAE, also PixArt-Sigma's (scaling 0.13025)."""
    return cls(scaling_factor=0.13025)

  @classmethod
  def flux(cls) -> VAEConfig:
    """The FLUX.1 VAE: 16 latent channels, no quant convs, scaling 0.3611, shift 0.1159."""
    return cls(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=0.3611, shift_factor=0.1159)


@flax.struct.dataclass
class LatentDistribution:
  """The diagonal Gaussian posterior of `encode`: mean and log-variance (B, latent, h, w).

  `logvar` is clamped to [-30, 20] as in diffusers' `DiagonalGaussianDistribution`.
  """

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    """exp(logvar / 2), (B, latent, h, w)."""
    return jnp.exp(0.5 * self.logvar)

  def mode(self) -> jax.Array:
    """The most likely latent: the mean."""
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    """mean + std * N(0, 1) noise drawn from `key`."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class SpatialAttention(Attention):
  """The mid block's single-head self-attention over all H*W positions, with a residual.

  `group_norm`, then the shared diffusers `Attention` (one head of width C) on the H*W tokens,
  then + input. (N, H, W, C) -> (N, H, W, C).
  """

  def __init__(self, channels: int, groups: int, *, dtype: jnp.dtype | None,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    super().__init__(channels, 1, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = GroupNorm(groups, channels, eps=_EPS, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    return x + super().__call__(tokens).reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
  """ResNet, then (attention, ResNet); attention optional (`mid_block_add_attention`)."""

  def __init__(self, channels: int, groups: int, add_attention: bool, *,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attentions = nnx.List([SpatialAttention(channels, groups, **kw)
                                if add_attention else None])
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions[0] is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
  """`num_layers` ResNet blocks, then an optional stride-2 `Downsample2D`."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               add_downsample: bool, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
        for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)]) if add_downsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nnx.Module):
  """`num_layers` ResNet blocks, then an optional nearest-2x `Upsample2D`."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               add_upsample: bool, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
        for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
  """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent), f = `downsample_factor`."""

  def __init__(self, config: VAEConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = config.block_out_channels
    groups = config.norm_num_groups
    self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                           add_downsample=i < len(channels) - 1, **kw)
        for i in range(len(channels))])
    self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(groups, channels[-1], eps=_EPS, param_dtype=param_dtype)
    self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.mid_block(self.feature_maps(x)[-1])
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

  def feature_maps(self, x: jax.Array) -> list[jax.Array]:
    """The output of each down block, (B, H_l, W_l, C_l) channels-last, for perceptual metrics."""
    x = self.conv_in(x)
    maps = []
    for block in self.down_blocks:
      x = block(x)
      maps.append(x)
    return maps


class Decoder(nnx.Module):
  """Latents (B, h, w, latent) -> image (B, h*f, w*f, out)."""

  def __init__(self, config: VAEConfig, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = tuple(reversed(config.block_out_channels))
    groups = config.norm_num_groups
    self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1, **kw)
    self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention, **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1,
                         groups, add_upsample=i < len(channels) - 1, **kw)
        for i in range(len(channels))])
    self.conv_norm_out = GroupNorm(groups, channels[-1], eps=_EPS, param_dtype=param_dtype)
    self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """diffusers' AutoencoderKL (no tiling or slicing). NCHW in and out, NHWC inside.

  `dtype` is the compute dtype (default: the input's); `param_dtype` that of the parameters.
  """

  def __init__(self, config: VAEConfig, *, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    latent = config.latent_channels
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, **kw) if config.use_quant_conv else None
    self.post_quant_conv = (Conv2d(latent, latent, 1, **kw) if config.use_post_quant_conv
                            else None)

  def _check(self, name: str, x: jax.Array, channels: int, multiple: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
      raise ValueError(f"AutoencoderKL.{name}: expected (B, {channels}, H, W) with H, W "
                       f"multiples of {multiple}, got {x.shape}")

  def _to_nhwc(self, x: jax.Array) -> jax.Array:
    """NCHW input in the computation dtype -> NHWC."""
    return x.astype(self.dtype if self.dtype is not None else x.dtype).transpose(0, 2, 3, 1)

  def encode(self, sample: jax.Array) -> LatentDistribution:
    """Images (B, in_channels, H, W), usually in [-1, 1] -> posterior over (B, latent, H/f, W/f).

    H and W must be multiples of f = `config.downsample_factor` (8 for the released VAEs).
    """
    self._check("encode", sample, self.config.in_channels, self.config.downsample_factor)
    moments = self.encoder(self._to_nhwc(sample))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    moments = moments.transpose(0, 3, 1, 2)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return LatentDistribution(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  def feature_maps(self, sample: jax.Array) -> list[jax.Array]:
    """Images (B, in_channels, H, W) -> each encoder down block's output (B, H_l, W_l, C_l).

    The feature extractor of `svdq_jax.metrics.feature_distance` (an LPIPS-like distance on a
    trained VAE's encoder features, for comparing quantized against 16-bit images).
    """
    self._check("feature_maps", sample, self.config.in_channels, self.config.downsample_factor)
    return self.encoder.feature_maps(self._to_nhwc(sample))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Raw latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
    self._check("decode", latents, self.config.latent_channels, 1)
    z = self._to_nhwc(latents)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).transpose(0, 3, 1, 2)

  def __call__(self, sample: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mode (diffusers' `forward(sample_posterior=False)`)."""
    return self.decode(self.encode(sample).mode())

  def scale_latents(self, latents: jax.Array) -> jax.Array:
    """Raw latents -> the diffusion model's scale: `(z - shift_factor) * scaling_factor`."""
    shift = self.config.shift_factor or 0.0
    return (latents - shift) * self.config.scaling_factor

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    """Inverse of `scale_latents`, applied before `decode`."""
    shift = self.config.shift_factor or 0.0
    return latents / self.config.scaling_factor + shift

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike,
                      dtype: jnp.dtype | None = None) -> AutoencoderKL:
    """Loads a diffusers `AutoencoderKL` folder (or one of ours) without torch.

    `dtype` (e.g. `jnp.bfloat16`) is both the computation dtype and the dtype floating parameters
    are cast to; None: float32 parameters, computation in the input's dtype (a svdq-jax checkpoint
    keeps its stored dtypes).
    """
    return load_pretrained(path, "vae", dtype=dtype)
