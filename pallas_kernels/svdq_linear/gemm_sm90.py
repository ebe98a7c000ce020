"""Kernel 2 (Mosaic GPU, sm_90): the W4A4 GEMM with the low-rank, bias and GELU epilogue.

Hopper has no 4-bit tensor cores. Both operands stay packed 4-bit in HBM (`jnp.int4` / `uint4`
arrays, the same bytes as docs/format.md's uint8 packing) and are TMA-copied as 4-bit tiles; a
pipeline step covers `groups_per_step` 64-wide K groups. Each step widens the tiles in registers to
the tensor-core carrier (int8 by default; float8_e4m3fn as an option, every INT4 value is exact
in it), stores them to SMEM and issues one wgmma per group into a fresh group accumulator (int32
for s8, f32 for e4m3; the group sum is an exact integer of at most 13 bits either way). With several
groups per step all their wgmmas are issued before the first is awaited, so the CUDA-core rescale
of group g (by ascale[m] * wscale[n], into a float32 register carry, in group order g = 0, 1, ...)
overlaps the tensor-core work of the groups after it.

Ordering of the carrier tiles. Every thread stores part of a_s/b_s, and the wgmmas of all four warps
read them asynchronously (B is shared by the whole warpgroup); a thread's wgmma wait covers only its
own view, so the next step must not store into a_s/b_s before every thread has waited. By default
Pallas brackets each SMEM store with a warpgroup barrier (its automatic barriers), which orders
those stores after all threads' waits of the previous step; the price is a bar.sync before and
after every store and before every TMA refill, 17 per step with two groups per step.
`GemmConfig.manual_barriers` compiles without them: the carrier tiles are then double-buffered
by step parity, so a slot is rewritten two steps later, after the commit_smem barrier of the step in
between (which every thread reaches only after its waits); and the scale tiles, read after that
barrier, are released to the TMA refill one step late (`delay_release=1`) for the same reason. The
4-bit tiles are read before the barrier and need nothing more.
The epilogue adds the low-rank product (one bf16 wgmma into the same tile; the wrapper passes the
f32 x @ lora_down as two bf16 terms, hi and lo, against a stacked lora_up), the bias, optionally a
tanh-GELU, and stores the tile through SMEM with TMA. Every CTA writes its own output tile once;
nothing is accumulated across grid steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.svdq_linear.config import (
    GROUP_SIZE,
    H100_SMEM_BYTES,
    GemmConfig,
    gemm_carrier_slots,
    gemm_smem_bytes,
)
from pallas_kernels.svdq_linear.mosaic import interpret_params, smem_transforms

_MAGIC_FLOAT = 12582912.0  # 1.5 * 2**23: f32 ulp 1, integers below 2**22 fit in the mantissa
_MAGIC_BITS = 0x4B400000  # the bit pattern of _MAGIC_FLOAT

_CARRIERS = {
    "s8": (jnp.int8, jnp.int32),
    "e4m3": (jnp.float8_e4m3fn, jnp.float32),
}


def w4a4_gemm_kernel(
    codes: jax.Array,
    ascales_t: jax.Array,
    qweight4: jax.Array,
    wscales: jax.Array,
    lora_act: jax.Array,
    lora_up_t: jax.Array,
    bias: jax.Array,
    *,
    apply_gelu: bool,
    out_dtype: jnp.dtype,
    config: GemmConfig,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
  """Runs kernel 2 on tile-aligned operands.

  Args:
    codes: (M, K) jnp.int4 (signed) or jnp.uint4 (shifted) activation codes.
    ascales_t: (K // 64, M) float32 activation scales, transposed.
    qweight4: (N, K) jnp.int4 weight codes.
    wscales: (K // 64, N) float32 weight scales.
    lora_act: (M, r) bfloat16 left operand of the low-rank product, r a multiple of 16; r = 0
      skips the low-rank term.
    lora_up_t: (N, r) bfloat16 right operand, transposed (K-major B operand).
    bias: (N,) float32.
    apply_gelu: apply tanh-GELU after the bias.
    out_dtype: dtype of the result.
    config: block sizes and carrier; M % block_m == 0 and N % block_n == 0 are required.
    interpret: run in the Mosaic GPU interpreter (CPU); True or explicit InterpretGPUParams.

  Returns:
    (M, N) out_dtype.
  """
  m, k = codes.shape
  n = qweight4.shape[0]
  rank = lora_act.shape[1]
  tm, tn = config.block_m, config.block_n
  groups = k // GROUP_SIZE
  if (m % tm or n % tn or k % GROUP_SIZE or rank % 16 or qweight4.shape != (n, k)
      or codes.dtype not in (jnp.int4, jnp.uint4) or qweight4.dtype != jnp.int4):
    raise ValueError(
        f"w4a4_gemm_kernel: needs int4/uint4 codes (M, K), int4 weights (N, K) with M % {tm}, "
        f"N % {tn}, K % 64 and rank % 16 all zero; got codes {codes.shape} {codes.dtype}, "
        f"weights {qweight4.shape} {qweight4.dtype}, rank {rank}")
  per_step = config.groups_per_step
  if groups % per_step:
    raise ValueError(f"w4a4_gemm_kernel: K // 64 = {groups} groups, not a multiple of "
                     f"groups_per_step = {per_step}")
  out_itemsize = jnp.dtype(out_dtype).itemsize
  smem_bytes = gemm_smem_bytes(config, rank, out_itemsize)
  if smem_bytes > H100_SMEM_BYTES:
    raise ValueError(
        f"w4a4_gemm_kernel: {config} with a low-rank K of {rank} (the stacked hi/lo operand) needs "
        f"{smem_bytes} bytes of shared memory, more than the {H100_SMEM_BYTES} a Hopper CTA has; "
        "use a lower rank, fewer groups_per_step or max_concurrent_steps, or a smaller tile")
  carrier, group_acc_dtype = _CARRIERS[config.carrier]
  magic = config.carrier == "s8" and config.magic_int_to_float

  def group_sum_to_f32(group_sum):
    """The exact group sum as f32. With the magic-number conversion the int32 sum (|.| <= 7680 <
    2^22) is added to the bit pattern of 1.5 * 2^23 and reinterpreted: two full-rate adds instead
    of an int-to-float conversion, which runs at a fraction of the FMA rate."""
    if not magic:
      return group_sum.astype(jnp.float32)
    biased = lax.bitcast_convert_type(group_sum + _MAGIC_BITS, jnp.float32)
    return biased - _MAGIC_FLOAT
  slots = gemm_carrier_slots(config)

  def carrier_slot(carrier_ref, step_index):
    """The (per_step, rows, 64) carrier tiles step `step_index` writes: slot step % 2 when
    double-buffered."""
    return carrier_ref.at[lax.rem(step_index, slots) if slots > 1 else 0]

  carrier_bits = 8
  op_transforms = smem_transforms(GROUP_SIZE * carrier_bits // 8, carrier_bits)
  four_bit_transforms = smem_transforms(GROUP_SIZE // 2, 4)

  with_low_rank = rank > 0

  def body(*gmem_refs, a_s, b_s, bias_s, out_s, epilogue_bar, lora_act_s=None, lora_up_s=None):
    if with_low_rank:
      codes_g, ascales_g, weights_g, wscales_g, lora_act_g, lora_up_g, bias_g, out_g = gmem_refs
    else:
      codes_g, ascales_g, weights_g, wscales_g, bias_g, out_g = gmem_refs
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    rows, cols = pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)
    # The epilogue operands travel while the main loop runs.
    if with_low_rank:
      plgpu.copy_gmem_to_smem(lora_act_g.at[rows], lora_act_s, epilogue_bar)
      plgpu.copy_gmem_to_smem(lora_up_g.at[cols], lora_up_s, epilogue_bar)
    plgpu.copy_gmem_to_smem(bias_g.at[cols], bias_s, epilogue_bar)

    def step(idx, *refs):
      """One pipeline step: `per_step` K groups, their wgmmas in flight together."""
      *tiles, carry = refs
      a4, b4, a_scales, w_scales = (tiles[i * per_step:(i + 1) * per_step] for i in range(4))
      a_slot, b_slot = carrier_slot(a_s, idx[0]), carrier_slot(b_s, idx[0])
      for i in range(per_step):
        a_slot.at[i][...] = a4[i][...].astype(carrier)
        b_slot.at[i][...] = b4[i][...].astype(carrier)
      plgpu.commit_smem()

      def group_products(*acc_refs):
        for i, acc_ref in enumerate(acc_refs):
          plgpu.wgmma(acc_ref, a_slot.at[i], b_slot.at[i].T)
        total = carry
        for i, acc_ref in enumerate(acc_refs):
          # Group i is done once at most the later groups' wgmmas are pending; the rescale of
          # group i overlaps them. Groups are added in order, as the reference does. (`acc_ref[...]`
          # would wait for all of them: it is wgmma_accumulator_load with wait_n=0.) The last
          # load waits for this thread's share of every wgmma (see the module docstring for when
          # the carrier slot may be rewritten).
          group_sum = plgpu.wgmma_accumulator_load(acc_ref, wait_n=per_step - 1 - i)
          scale = a_scales[i][0][:, None] * w_scales[i][0][None, :]
          total = total + group_sum_to_f32(group_sum) * scale
        return total

      return pl.run_scoped(
          group_products, *[plgpu.ACC((tm, tn), group_acc_dtype) for _ in range(per_step)])

    def group_spec(rows_per_tile, tile_index, offset, **kwargs):
      return plgpu.BlockSpec(
          (rows_per_tile, GROUP_SIZE), lambda g: (tile_index, per_step * g + offset), **kwargs)

    def scale_spec(cols_per_tile, tile_index, offset):
      return plgpu.BlockSpec((1, cols_per_tile), lambda g: (per_step * g + offset, tile_index),
                             delay_release=1 if config.manual_barriers else 0)

    offsets = range(per_step)
    acc = plgpu.emit_pipeline(
        step,
        grid=(groups // per_step,),
        in_specs=[
            *[group_spec(tm, mi, i, transforms=four_bit_transforms) for i in offsets],
            *[group_spec(tn, ni, i, transforms=four_bit_transforms) for i in offsets],
            *[scale_spec(tm, mi, i) for i in offsets],
            *[scale_spec(tn, ni, i) for i in offsets],
        ],
        max_concurrent_steps=config.max_concurrent_steps,
        init_carry=jnp.zeros((tm, tn), jnp.float32),
    )(*[codes_g] * per_step, *[weights_g] * per_step, *[ascales_g] * per_step,
      *[wscales_g] * per_step)

    plgpu.barrier_wait(epilogue_bar)

    def low_rank(acc_ref):
      plgpu.wgmma(acc_ref, lora_act_s, lora_up_s.T)
      plgpu.wgmma_wait(0)
      return acc_ref[...]

    y = acc + pl.run_scoped(low_rank, plgpu.ACC((tm, tn), jnp.float32)) if with_low_rank else acc
    y = y + bias_s[...][None, :]
    if apply_gelu:
      y = jax.nn.gelu(y, approximate=True)
    out_s[...] = y.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, out_g.at[rows, cols])
    plgpu.wait_smem_to_gmem(0)

  scratch_types = dict(
      a_s=plgpu.SMEM((slots, per_step, tm, GROUP_SIZE), carrier, transforms=op_transforms),
      b_s=plgpu.SMEM((slots, per_step, tn, GROUP_SIZE), carrier, transforms=op_transforms),
      bias_s=plgpu.SMEM((tn,), jnp.float32),
      out_s=plgpu.SMEM((tm, tn), out_dtype,
                       transforms=smem_transforms(tn * out_itemsize, 8 * out_itemsize)),
      epilogue_bar=plgpu.Barrier(num_arrivals=3 if with_low_rank else 1),
  )
  operands = [codes, ascales_t, qweight4, wscales.astype(jnp.float32)]
  if with_low_rank:
    lora_transforms = smem_transforms(2 * rank, 16)
    scratch_types.update(
        lora_act_s=plgpu.SMEM((tm, rank), jnp.bfloat16, transforms=lora_transforms),
        lora_up_s=plgpu.SMEM((tn, rank), jnp.bfloat16, transforms=lora_transforms))
    operands += [lora_act.astype(jnp.bfloat16), lora_up_t.astype(jnp.bfloat16)]
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(m // tm, n // tn),
      grid_names=("m", "n"),
      scratch_types=scratch_types,
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=config.manual_barriers),
      interpret=interpret_params(interpret),
  )
  return kernel(*operands, bias.astype(jnp.float32))
