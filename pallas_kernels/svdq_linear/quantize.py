"""Kernel 1 (Mosaic GPU, sm_90): activation quantization fused with the low-rank down-projection.

One CTA owns `block_m` token rows and a contiguous run of K groups (all of them unless the config
splits K). A TMA pipeline streams, per 64-wide group, the x tile (block_m, 64) in x's own dtype
(bf16 or f32), the smoothing factors and the lora_down tile (64, r). In registers the tile is
shifted, divided by smooth, reduced to a per-row amax, scaled and rounded half-to-even into 4-bit
codes (written as a jnp.int4 / uint4 tile, i.e. already packed two per byte), all in float32 from
x's own values: the codes are those the XLA path computes for the same input. A bf16 x tile is
itself the A operand of the bf16 wgmma into the (block_m, r) float32 low-rank accumulator; an f32
tile is split into two bf16 terms, hi = bf16(x) and lo = bf16(x - hi), stored to SMEM and both
multiplied by lora_down into the same accumulator (about 16 bits of x instead of bf16's 8, as
kernel 2 does for the low-rank activations). x is read from HBM exactly once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.svdq_linear.config import GROUP_SIZE, QuantizeConfig
from pallas_kernels.svdq_linear.mosaic import code_dtype, interpret_params, smem_transforms
from pallas_kernels.svdq_linear.reference import code_range


def quantize_activations_kernel(
    x: jax.Array,
    smooth: jax.Array,
    lora_down: jax.Array,
    *,
    act_shift: float,
    config: QuantizeConfig,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs kernel 1 on tile-aligned operands.

  Args:
    x: (M, K) bfloat16 or float32, M a multiple of config.block_m, K of 64 * config.k_splits.
    smooth: (K,) float32.
    lora_down: (K, r) bfloat16, r a multiple of 16; r = 0 skips the low-rank product.
    act_shift: 0 for signed codes, else unsigned codes of x + act_shift.
    config: block sizes.
    interpret: run in the Mosaic GPU interpreter (CPU); True or explicit InterpretGPUParams.

  Returns:
    codes (M, K) int4 (uint4 when act_shift != 0), ascales transposed (K // 64, M) float32, and the
    per-split partial low-rank products (k_splits, M, r) float32 (their sum is x @ lora_down).
  """
  m, k = x.shape
  rank = lora_down.shape[1]
  tm, splits = config.block_m, config.k_splits
  groups = k // GROUP_SIZE
  if m % tm or groups % splits or rank % 16 or x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(
        f"quantize_activations_kernel: needs bf16 or f32 x with M % {tm} == 0, K // 64 % {splits} "
        f"== 0 "
        f"and rank % 16 == 0; got x {x.shape} {x.dtype}, lora_down {lora_down.shape}")
  groups_per_split = groups // splits
  unsigned = act_shift != 0.0
  qmin, qmax = code_range(unsigned)
  codes_dtype = code_dtype(unsigned)
  shift = float(act_shift)

  with_low_rank = rank > 0
  split_x = x.dtype == jnp.float32  # the low-rank wgmma takes bf16: hi and lo terms of x
  x_bits = jnp.dtype(x.dtype).itemsize * 8
  bf16_tile_transforms = smem_transforms(2 * GROUP_SIZE, 16)
  out_type = [
      jax.ShapeDtypeStruct((m, k), codes_dtype),
      jax.ShapeDtypeStruct((groups, m), jnp.float32),
  ]
  scratch_types = dict(
      codes_s=plgpu.SMEM((2, tm, GROUP_SIZE), codes_dtype,
                         transforms=smem_transforms(GROUP_SIZE // 2, 4)),
      ascale_s=plgpu.SMEM((2, 1, tm), jnp.float32),
  )
  in_specs = [
      plgpu.BlockSpec((tm, GROUP_SIZE), lambda g: (lax.axis_index("m"), first_group(g)),
                      transforms=smem_transforms(GROUP_SIZE * x_bits // 8, x_bits)),
      plgpu.BlockSpec((1, GROUP_SIZE), lambda g: (0, first_group(g))),
  ]
  if with_low_rank:
    out_type.append(jax.ShapeDtypeStruct((splits, m, rank), jnp.float32))
    scratch_types["lora_s"] = plgpu.SMEM((tm, rank), jnp.float32)
    in_specs.append(plgpu.BlockSpec((rank, GROUP_SIZE), lambda g: (0, first_group(g)),
                                    transforms=bf16_tile_transforms))
    if split_x:
      scratch_types["x_hi_s"] = plgpu.SMEM((tm, GROUP_SIZE), jnp.bfloat16,
                                           transforms=bf16_tile_transforms)
      scratch_types["x_lo_s"] = plgpu.SMEM((tm, GROUP_SIZE), jnp.bfloat16,
                                           transforms=bf16_tile_transforms)

  def first_group(local_group):
    return lax.axis_index("s") * groups_per_split + local_group

  def body(*gmem_refs, codes_s, ascale_s, lora_s=None, x_hi_s=None, x_lo_s=None):
    if with_low_rank:
      x_g, smooth_g, lora_down_t_g, codes_g, ascales_g, lora_g = gmem_refs
      inputs = (x_g, smooth_g, lora_down_t_g)
    else:
      x_g, smooth_g, codes_g, ascales_g = gmem_refs
      inputs = (x_g, smooth_g)
    rows = pl.ds(lax.axis_index("m") * tm, tm)

    def quantize_group(local_group, x, smooth_s):
      """Quantizes one (tm, 64) group of x (registers, f32) and sends codes and scales to HBM."""
      group = first_group(local_group)
      slot = local_group % 2
      xs = (x + shift) / smooth_s[0][None, :]
      scale = jnp.max(jnp.abs(xs), axis=1) / float(qmax)
      safe_scale = jnp.where(scale == 0.0, 1.0, scale)
      q = jnp.clip(lax.round(xs / safe_scale[:, None], lax.RoundingMethod.TO_NEAREST_EVEN),
                   float(qmin), float(qmax))
      # The copies issued from this slot two steps ago must have left SMEM before we overwrite it.
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      codes_s.at[slot][...] = q.astype(jnp.int32).astype(codes_dtype)
      ascale_s.at[slot][0] = scale
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          codes_s.at[slot], codes_g.at[rows, pl.ds(group * GROUP_SIZE, GROUP_SIZE)],
          commit_group=False)
      plgpu.copy_smem_to_gmem(ascale_s.at[slot], ascales_g.at[pl.ds(group, 1), rows])

    def pipeline(step):
      plgpu.emit_pipeline(
          step, grid=(groups_per_split,), in_specs=in_specs,
          max_concurrent_steps=config.max_concurrent_steps)(*inputs)

    if with_low_rank:
      def scoped(acc_ref):
        def step(idx, x_s, smooth_s, ld_s):
          x = x_s[...].astype(jnp.float32)
          quantize_group(idx[0], x, smooth_s)
          if split_x:
            hi = x.astype(jnp.bfloat16)
            x_hi_s[...] = hi
            x_lo_s[...] = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, x_hi_s, ld_s.T)
            plgpu.wgmma(acc_ref, x_lo_s, ld_s.T)
          else:
            plgpu.wgmma(acc_ref, x_s, ld_s.T)
          plgpu.wgmma_wait(0)

        pipeline(step)
        return acc_ref[...]

      lora_s[...] = pl.run_scoped(scoped, plgpu.ACC((tm, rank), jnp.float32))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(lora_s, lora_g.at[lax.axis_index("s"), rows])
    else:
      pipeline(lambda idx, x_s, smooth_s: quantize_group(
          idx[0], x_s[...].astype(jnp.float32), smooth_s))
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(
      body,
      out_type=tuple(out_type),
      grid=(m // tm, splits),
      grid_names=("m", "s"),
      scratch_types=scratch_types,
      compiler_params=plgpu.CompilerParams(),
      interpret=interpret_params(interpret),
  )
  operands = [x, smooth.astype(jnp.float32).reshape(1, k)]
  if not with_low_rank:
    codes, ascales_t = kernel(*operands)
    return codes, ascales_t, jnp.zeros((splits, m, 0), jnp.float32)
  return kernel(*operands, lora_down.astype(jnp.bfloat16).T)
