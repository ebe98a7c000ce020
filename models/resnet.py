"""The convolutional blocks the VAE and the UNet share: ResNet block, 2x down- and upsampling.

diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (its models/resnet.py,
downsampling.py, upsampling.py) on channels-last (N, H, W, C) input, with diffusers' attribute
names so that parameter paths are checkpoint keys (`resnets/0/conv1/kernel`,
`downsamplers/0/conv/kernel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Conv2d, GroupNorm, Linear


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-conv3x3 twice plus a (1x1-conv when the width changes) shortcut.

  With `temb_channels` (the UNet's blocks) the projected timestep embedding,
  `time_emb_proj(silu(temb))`, is added per channel after the first conv (diffusers'
  `time_embedding_norm="default"`); without it (the VAE's blocks) there is no `time_emb_proj`.
  `eps` is the GroupNorms' (1e-6 in the VAE, the UNet config's `norm_eps`, 1e-5, in the UNet).
  """

  def __init__(self, in_channels: int, out_channels: int, groups: int, *,
               temb_channels: int | None = None, eps: float = 1e-6,
               dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(groups, in_channels, eps=eps, param_dtype=param_dtype)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **conv)
    self.time_emb_proj = (Linear(temb_channels, out_channels, **conv)
                          if temb_channels is not None else None)
    self.norm2 = GroupNorm(groups, out_channels, eps=eps, param_dtype=param_dtype)
    self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **conv)
    self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, **conv)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x (N, H, W, C_in); temb (N, temb_channels) when the block has `time_emb_proj`."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      if temb is None:
        raise ValueError("ResnetBlock2D: this block has a time_emb_proj and needs temb")
      h = h + self.time_emb_proj(jax.nn.silu(temb)).astype(h.dtype)[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class Downsample2D(nnx.Module):
  """3x3 stride-2 conv. `padding` 1 (the UNet's) pads each side by one; 0 (the VAE's) pads one
  row and column at the bottom/right only, as diffusers does for `padding=0`."""

  def __init__(self, channels: int, *, padding: int = 0, dtype: jnp.dtype | None,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.asymmetric = padding == 0
    self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.asymmetric:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
