"""Block configurations of the fused SVDQuant linear kernels and their selection by shape."""

from __future__ import annotations

import dataclasses
from typing import Literal

GROUP_SIZE = 64
"""The INT4 group width along K; one pipeline step of either kernel handles one group."""

Carrier = Literal["s8", "e4m3"]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """Tiles of kernel 1 (activation quantization fused with x @ lora_down).

  Attributes:
    block_m: token rows per CTA (a multiple of 64, the wgmma M granule).
    k_splits: the K groups are split into this many independent CTAs per row block; each writes its
      own partial (block_m, r) low-rank product and the wrapper sums them (never across grid steps).
    max_concurrent_steps: TMA pipeline depth over the K groups.
  """

  block_m: int = 64
  k_splits: int = 1
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if self.block_m <= 0 or self.block_m % 64:
      raise ValueError(f"QuantizeConfig.block_m must be a multiple of 64, got {self.block_m}")
    if self.k_splits < 1 or self.max_concurrent_steps < 1:
      raise ValueError(f"QuantizeConfig needs k_splits, max_concurrent_steps >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tiles of kernel 2 (the W4A4 GEMM with the low-rank, bias and GELU epilogue).

  Attributes:
    block_m: output rows per CTA (multiple of 64).
    block_n: output columns per CTA (multiple of 64, at most 256: one wgmma N).
    max_concurrent_steps: TMA pipeline depth over the K groups.
    carrier: the tensor-core type the 4-bit codes are widened to: "s8" (int8 wgmma into an int32
      group accumulator) or "e4m3" (every INT4 value is exact in float8_e4m3fn; fp8 wgmma into an
      f32 group accumulator, exact because a 64-wide group sum stays within 13 bits).
  """

  block_m: int = 128
  block_n: int = 128
  max_concurrent_steps: int = 2
  carrier: Carrier = "s8"

  def __post_init__(self):
    if self.block_m <= 0 or self.block_m % 64:
      raise ValueError(f"GemmConfig.block_m must be a positive multiple of 64, got {self.block_m}")
    if self.block_n <= 0 or self.block_n % 64 or self.block_n > 256:
      raise ValueError(f"GemmConfig.block_n must be 64, 128, 192 or 256, got {self.block_n}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"GemmConfig.max_concurrent_steps must be >= 1, got {self}")
    if self.carrier not in ("s8", "e4m3"):
      raise ValueError(f"GemmConfig.carrier must be 's8' or 'e4m3', got {self.carrier!r}")


@dataclasses.dataclass(frozen=True)
class SVDQLinearConfig:
  """The pair of kernel configurations used by one fused linear."""

  quantize: QuantizeConfig = QuantizeConfig()
  gemm: GemmConfig = GemmConfig()


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def select_config(m: int, k: int, n: int) -> SVDQLinearConfig:
  """Chooses block sizes for an (m, k) x (k, n) product (m tokens after flattening batch dims).

  Heuristic, not yet tuned on a GPU: small token counts use 64-row tiles and split K in kernel 1 so
  that enough CTAs run; large ones use 128x256 output tiles (two s8 wgmma of m64n256 per group)
  and a deeper pipeline. N tiles are narrowed when N is not a multiple of the wide tile, to limit
  the zero padding the wrapper adds.
  """
  groups = k // GROUP_SIZE
  block_m = 64 if m <= 512 else 128
  row_blocks = _round_up(m, block_m) // block_m
  k_splits = 1
  # Split K in kernel 1 while fewer CTAs than H100 SMs (132) run and each keeps >= 8 groups.
  while row_blocks * k_splits < 132 and groups % (2 * k_splits) == 0 and groups >= 16 * k_splits:
    k_splits *= 2
  block_n = 256 if m > 512 else 128
  if n % block_n and n % 128 == 0:
    block_n = 128
  elif n % block_n and n % 128:
    block_n = 64
  return SVDQLinearConfig(
      quantize=QuantizeConfig(block_m=64, k_splits=k_splits, max_concurrent_steps=2),
      gemm=GemmConfig(block_m=block_m, block_n=block_n, max_concurrent_steps=4 if m > 512 else 2),
  )
