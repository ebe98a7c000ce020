"""Mosaic GPU helpers both kernels use: SMEM tile layouts, the interpreter flag, the code dtype."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def smem_transforms(minor_bytes: int, bits: int) -> tuple[plgpu.Transform, ...]:
  """Tiling + swizzle for an SMEM tile whose minor dimension spans `minor_bytes` (32/64/128+)."""
  swizzle = min(minor_bytes, 128)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def interpret_params(interpret: bool | plgpu.InterpretGPUParams) -> plgpu.InterpretGPUParams | None:
  """Maps the wrappers' `interpret` flag (or explicit interpreter parameters) to plgpu.kernel's."""
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def code_dtype(unsigned: bool) -> jnp.dtype:
  """The 4-bit storage dtype of the activation codes (packed two per byte in HBM)."""
  return jnp.dtype(jnp.uint4 if unsigned else jnp.int4)
