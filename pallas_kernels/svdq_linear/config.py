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

  Kernel 2 runs one warpgroup (128 threads) per CTA, which holds the f32 carry and the group
  accumulators in registers: keep `gemm_accumulator_registers` within REGISTERS_PER_THREAD (the
  default 64 x 128 tile with two groups per step needs 192), or the tile spills to local memory.
  Larger tiles lower (ptxas, which would spill, is not run by the deviceless check) but are slow.

  Attributes:
    block_m: output rows per CTA (multiple of 64).
    block_n: output columns per CTA (multiple of 64, at most 256: one wgmma N).
    max_concurrent_steps: TMA pipeline depth over the K steps.
    groups_per_step: 64-wide K groups per pipeline step; their wgmmas are in flight together so
      that each group's rescale overlaps the next groups' MMA (K is padded to a multiple).
    carrier: the tensor-core type the 4-bit codes are widened to: "s8" (int8 wgmma into an int32
      group accumulator) or "e4m3" (every INT4 value is exact in float8_e4m3fn; fp8 wgmma into an
      f32 group accumulator, exact because a 64-wide group sum stays within 13 bits).
    magic_int_to_float: (s8) convert each int32 group sum to f32 with the exact magic-number trick
      (integer add, reinterpret, float subtract) instead of the slower conversion instruction.
    manual_barriers: compile without Pallas's automatic warpgroup barriers around every SMEM store
      (`CompilerParams.unsafe_no_auto_barriers`); the carrier tiles are then double-buffered by
      step parity and the scale tiles released one step late, so that each step's commit_smem
      barrier is the only one it needs (gemm_sm90's docstring gives the argument). Needs
      max_concurrent_steps >= 2; the late release leaves the scales prefetched
      max_concurrent_steps - 1 steps ahead, so at 2 stages each step waits for its scales' copy.
      `benchmarks/kernels.py --sweep` times it.
  """

  block_m: int = 64
  block_n: int = 128
  max_concurrent_steps: int = 2
  groups_per_step: int = 2
  carrier: Carrier = "s8"
  magic_int_to_float: bool = True
  manual_barriers: bool = False

  def __post_init__(self):
    if self.block_m <= 0 or self.block_m % 64:
      raise ValueError(f"GemmConfig.block_m must be a positive multiple of 64, got {self.block_m}")
    if self.block_n <= 0 or self.block_n % 64 or self.block_n > 256:
      raise ValueError(f"GemmConfig.block_n must be 64, 128, 192 or 256, got {self.block_n}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"GemmConfig.max_concurrent_steps must be >= 1, got {self}")
    if self.groups_per_step not in (1, 2, 4):
      raise ValueError(f"GemmConfig.groups_per_step must be 1, 2 or 4, got {self.groups_per_step}")
    if self.carrier not in ("s8", "e4m3"):
      raise ValueError(f"GemmConfig.carrier must be 's8' or 'e4m3', got {self.carrier!r}")
    if self.manual_barriers and self.max_concurrent_steps < 2:
      raise ValueError("GemmConfig.manual_barriers releases the scale tiles one step late and "
                       f"needs max_concurrent_steps >= 2, got {self.max_concurrent_steps}")


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `value` (the zero padding of the wrappers)."""
  return -(-value // multiple) * multiple


MAX_RANK = 256
"""Largest low-rank width: kernel 1's x @ lora_down is one wgmma of N = rank (at most 256).
Kernel 2 keeps the stacked hi/lo operand in SMEM: with select_config's 64 x 128 tiles ranks above
192 exceed the H100's shared memory, and kernel 2 raises a ValueError saying so
(gemm_smem_bytes)."""


def padded_rank(rank: int) -> int:
  """The rank the kernels run with: 16 (up to 16) or the next multiple of 32. Kernel 2's stacked
  hi/lo low-rank operand (block, 2 * rank) bf16 then spans 64 bytes or a multiple of 128, which
  its SMEM swizzle needs (rank 48 would give 192 bytes, which does not lower)."""
  return 0 if rank == 0 else 16 if rank <= 16 else round_up(rank, 32)


REGISTERS_PER_THREAD = 255
"""32-bit registers one thread may use on sm_90 (CUDA's per-thread limit)."""

ACCUMULATOR_REGISTER_BUDGET = 192
"""Registers per thread kernel 2's accumulators may take, leaving the rest of
REGISTERS_PER_THREAD for scales, widened tiles and addresses."""


def gemm_accumulator_registers(config: GemmConfig) -> int:
  """32-bit registers per thread that kernel 2's main loop keeps live in accumulators: the f32
  carry and one group accumulator per group of a step, each (block_m, block_n) spread over the
  128 threads of the CTA's single warpgroup."""
  return (1 + config.groups_per_step) * config.block_m * config.block_n // 128


H100_SMEM_BYTES = 232_448
"""Shared memory one CTA may use on sm_90 (the Mosaic GPU lowering rejects more)."""

H100_SM_SMEM_BYTES = 233_472
"""Shared memory of one H100 SM (228 KiB), shared by the CTAs resident on it."""

SMEM_RESERVED_PER_CTA = 1024
"""Shared memory the hardware reserves per resident CTA on sm_90."""

SMEM_ALIGNMENT = 1024
"""Mosaic GPU starts every shared-memory buffer at a multiple of 1 KiB (the 128-byte swizzle's
period), so each buffer takes its size rounded up to that."""

MBARRIER_BYTES = 8
"""Shared memory of one mbarrier (a 64-bit word)."""


def ctas_per_sm_by_smem(smem_bytes: int) -> int:
  """How many CTAs of `smem_bytes` dynamic shared memory each fit on one H100 SM."""
  return H100_SM_SMEM_BYTES // (smem_bytes + SMEM_RESERVED_PER_CTA)


def gemm_carrier_slots(config: GemmConfig) -> int:
  """Copies of the widened carrier tiles kernel 2 keeps: 2 (by step parity) with manual barriers,
  else 1 (Pallas's automatic barriers order each step's stores after the previous wgmmas)."""
  return 2 if config.manual_barriers else 1


def gemm_smem_bytes(config: GemmConfig, rank: int = 64, out_itemsize: int = 2) -> int:
  """Dynamic shared memory kernel 2 allocates for `config`, to the byte: per group of a step
  the pipelined 4-bit tiles and f32 scales of both operands (one buffer of
  `max_concurrent_steps` tiles each), the widened carrier tiles (`gemm_carrier_slots` copies),
  the low-rank operands (`rank` = the kernel's K of the low-rank wgmma; none at 0), the bias
  and the output staging tile, each buffer rounded up to SMEM_ALIGNMENT; then one mbarrier per
  pipeline stage and the epilogue's."""
  tm, tn, stages = config.block_m, config.block_n, config.max_concurrent_steps

  def buffer(nbytes: int) -> int:
    return round_up(nbytes, SMEM_ALIGNMENT)

  pipelined = config.groups_per_step * sum(
      buffer(stages * rows * GROUP_SIZE // 2) + buffer(stages * rows * 4) for rows in (tm, tn))
  carriers = sum(buffer(gemm_carrier_slots(config) * config.groups_per_step * rows * GROUP_SIZE)
                 for rows in (tm, tn))
  low_rank = buffer(2 * rank * tm) + buffer(2 * rank * tn)
  epilogue = buffer(4 * tn) + buffer(out_itemsize * tm * tn)
  return pipelined + carriers + low_rank + epilogue + MBARRIER_BYTES * (stages + 1)


@dataclasses.dataclass(frozen=True)
class SVDQLinearConfig:
  """The pair of kernel configurations used by one fused linear."""

  quantize: QuantizeConfig = QuantizeConfig()
  gemm: GemmConfig = GemmConfig()


def select_config(m: int, k: int, n: int, rank: int = 32) -> SVDQLinearConfig:
  """Chooses block sizes for an (m, k) x (k, n) product (m tokens after flattening batch dims)
  with a rank-`rank` low-rank branch.

  Heuristic, not yet tuned on a GPU: small token counts split K in kernel 1 so that enough CTAs
  run. Output tiles are 64 x 128, the largest whose accumulators fit ACCUMULATOR_REGISTER_BUDGET
  with two groups per step on kernel 2's single warpgroup (64 x 64 when N is not a multiple of
  128, to limit the zero padding the wrapper adds). Large token counts get the deepest pipeline
  that still lets two CTAs share an SM (3 stages at rank 32: 4 stages would leave one warpgroup per
  SM, with nothing to run while it rescales), small ones 2 stages.
  """
  groups = k // GROUP_SIZE
  block_m = 64
  row_blocks = round_up(m, block_m) // block_m
  k_splits = 1
  # Split K in kernel 1 while fewer CTAs than H100 SMs (132) run and each keeps >= 8 groups.
  while row_blocks * k_splits < 132 and groups % (2 * k_splits) == 0 and groups >= 16 * k_splits:
    k_splits *= 2
  block_n = 128 if n % 128 == 0 else 64
  epilogue_rank = 2 * padded_rank(rank)  # the hi/lo bf16 split doubles the low-rank operand
  gemm = GemmConfig(block_m=block_m, block_n=block_n, max_concurrent_steps=2)
  if m > 512:
    for stages in (4, 3):
      deeper = dataclasses.replace(gemm, max_concurrent_steps=stages)
      if ctas_per_sm_by_smem(gemm_smem_bytes(deeper, epilogue_rank)) >= 2:
        gemm = deeper
        break
  return SVDQLinearConfig(
      quantize=QuantizeConfig(block_m=64, k_splits=k_splits, max_concurrent_steps=2), gemm=gemm)
