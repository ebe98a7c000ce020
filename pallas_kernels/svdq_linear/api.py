"""Public wrappers of the fused SVDQuant linear: shape checks, padding, batch dims, dispatch.

The kernels need tile-aligned operands; the wrappers pad ragged token counts (M), K up to the K
split of kernel 1, N up to the output tile and the rank (`padded_rank`) with zeros, which contribute
nothing (a zero activation group has scale 0 and codes 0; zero weight rows give zero columns that
are sliced off), then slice the result back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.svdq_linear.config import (
    GROUP_SIZE,
    H100_SMEM_BYTES,
    MAX_RANK,
    GemmConfig,
    QuantizeConfig,
    SVDQLinearConfig,
    gemm_smem_bytes,
    padded_rank,
    round_up,
    select_config,
)
from pallas_kernels.svdq_linear.gemm_sm90 import w4a4_gemm_kernel
from pallas_kernels.svdq_linear.mosaic import code_dtype
from pallas_kernels.svdq_linear.quantize import quantize_activations_kernel


def is_supported(device: jax.Device | None = None) -> bool:
  """True on a Hopper (sm_90) CUDA GPU, the only target the Mosaic GPU kernels are written for."""
  try:
    device = device or jax.devices()[0]
  except RuntimeError:
    return False
  if device.platform != "gpu":
    return False
  capability = str(getattr(device, "compute_capability", ""))
  return capability.startswith("9.")


def unsupported_reason(m: int, k: int, n: int, rank: int, *, group_size: int = GROUP_SIZE,
                       out_dtype: jnp.dtype = jnp.bfloat16) -> str | None:
  """Why `svdq_linear` with its default config cannot compute an (m, k) x (k, n) product with a
  rank-`rank` low-rank branch and `out_dtype` output, or None when it can. Device independent
  (see `is_supported` for the device); callers check before dispatching instead of catching."""
  if group_size != GROUP_SIZE:
    return f"the kernels implement INT4 with group_size {GROUP_SIZE}, this layer has {group_size}"
  if k % GROUP_SIZE:
    return f"K = {k} input features is not a multiple of {GROUP_SIZE}"
  if rank > MAX_RANK:
    return f"the low-rank branch has rank {rank}, the kernels support at most {MAX_RANK}"
  gemm = select_config(m, k, n, rank).gemm
  smem = gemm_smem_bytes(gemm, 2 * padded_rank(rank), jnp.dtype(out_dtype).itemsize)
  if smem > H100_SMEM_BYTES:
    return (f"rank {rank} with a {jnp.dtype(out_dtype).name} output needs {smem} bytes of shared "
            f"memory in kernel 2, more than the {H100_SMEM_BYTES} of a Hopper CTA")
  return None


def _pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  pads = [(0, target - size) for size, target in zip(a.shape, shape, strict=True)]
  return jnp.pad(a, pads) if any(hi for _, hi in pads) else a


def _check_group_size(group_size: int, where: str) -> None:
  if group_size != GROUP_SIZE:
    raise ValueError(
        f"{where}: the Hopper kernels implement INT4 with group_size {GROUP_SIZE}, got "
        f"{group_size} (NVFP4's group 16 runs through the XLA reference path)")


def kernel_input_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype kernel 1 reads x in: bf16 stays bf16, any other float becomes f32 (exact for f16,
  and what the XLA path rounds f64 to before quantizing), so both paths quantize the same values."""
  return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


def _padded_quantize(x2, smooth, lora_down, act_shift, cfg: QuantizeConfig, m_pad, k_pad,
                     interpret):
  """Kernel 1 on zero-padded operands; returns int4 codes, transposed scales, f32 low-rank act."""
  k = x2.shape[1]
  rank = lora_down.shape[1]
  if rank > MAX_RANK:
    raise ValueError(f"svdq_linear kernels: lora_down {lora_down.shape} has rank {rank}, the "
                     f"fused x @ lora_down supports at most {MAX_RANK}")
  r_pad = padded_rank(rank)
  codes, ascales_t, lora_parts = quantize_activations_kernel(
      _pad_to(x2.astype(kernel_input_dtype(x2.dtype)), (m_pad, k_pad)),
      jnp.pad(smooth.astype(jnp.float32), (0, k_pad - k), constant_values=1.0),
      _pad_to(lora_down.astype(jnp.bfloat16), (k_pad, r_pad)),
      act_shift=act_shift, config=cfg, interpret=interpret)
  return codes, ascales_t, lora_parts.sum(axis=0)


def _padded_gemm(codes, ascales_t, qweight, wscales, lora_act, lora_up, bias, *, apply_gelu,
                 out_dtype, cfg: GemmConfig, interpret):
  """Kernel 2 on operands whose M and K are already padded; pads N and the rank.

  The f32 low-rank activations are split into two bf16 terms, hi = bf16(a) and lo = bf16(a - hi),
  and multiplied as [hi | lo] @ [lora_up; lora_up] in one bf16 wgmma of K = 2r: the product keeps
  about 16 bits of a (instead of bf16's 8) for a negligible cost.
  """
  m_pad, k_pad = codes.shape
  n, k_half = qweight.shape
  n_pad = round_up(n, cfg.block_n)
  r_pad = padded_rank(lora_act.shape[1])
  groups_pad = k_pad // GROUP_SIZE
  qweight4 = lax.bitcast_convert_type(_pad_to(qweight, (n_pad, k_pad // 2)), jnp.int4)
  bias = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  lora_act = _pad_to(lora_act.astype(jnp.float32), (m_pad, r_pad))
  lora_hi = lora_act.astype(jnp.bfloat16)
  lora_lo = (lora_act - lora_hi.astype(jnp.float32)).astype(jnp.bfloat16)
  lora_up = _pad_to(lora_up.astype(jnp.bfloat16), (r_pad, n_pad))
  out = w4a4_gemm_kernel(
      codes,
      ascales_t,
      qweight4.reshape(n_pad, k_pad),
      _pad_to(wscales.astype(jnp.float32), (groups_pad, n_pad)),
      jnp.concatenate([lora_hi, lora_lo], axis=1),
      jnp.concatenate([lora_up, lora_up], axis=0).T,
      _pad_to(bias, (n_pad,)),
      apply_gelu=apply_gelu, out_dtype=out_dtype, config=cfg, interpret=interpret)
  return out[:, :n] if n_pad != n else out


def _check_linear_shapes(x, qweight, wscales, smooth, lora_down, lora_up, bias) -> None:
  k = x.shape[-1]
  n = qweight.shape[0]
  rank = lora_down.shape[-1]
  expected = {
      "qweight": (qweight, (n, k // 2)),
      "wscales": (wscales, (k // GROUP_SIZE, n)),
      "smooth": (smooth, (k,)),
      "lora_down": (lora_down, (k, rank)),
      "lora_up": (lora_up, (rank, n)),
  }
  if bias is not None:
    expected["bias"] = (bias, (n,))
  if k % GROUP_SIZE:
    raise ValueError(f"svdq_linear: K = {k} input features must be a multiple of {GROUP_SIZE}")
  if qweight.dtype != jnp.uint8:
    raise ValueError(f"svdq_linear: qweight must be packed uint8 (N, K // 2), got {qweight.dtype}")
  for name, (array, shape) in expected.items():
    if tuple(array.shape) != shape:
      raise ValueError(
          f"svdq_linear: {name} has shape {tuple(array.shape)}, expected {shape} for x with "
          f"K = {k} and qweight with N = {n}")


@functools.partial(
    jax.jit,
    static_argnames=("group_size", "act_shift", "out_dtype", "interpret", "config", "apply_gelu"))
def svdq_linear(
    x: jax.Array,
    qweight: jax.Array,
    wscales: jax.Array,
    smooth: jax.Array,
    lora_down: jax.Array,
    lora_up: jax.Array,
    bias: jax.Array | None,
    *,
    group_size: int = GROUP_SIZE,
    act_shift: float = 0.0,
    out_dtype: jnp.dtype | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
    config: SVDQLinearConfig | None = None,
    apply_gelu: bool = False,
) -> jax.Array:
  """The fused SVDQuant INT4 linear: quantize(x / smooth) @ Q(R) + x @ lora_down @ lora_up + bias.

  Two kernel launches: kernel 1 reads x once and writes the packed codes, their scales and
  x @ lora_down; kernel 2 does the W4A4 GEMM with the low-rank product and bias in its epilogue.
  x is read in its own dtype (bf16, else f32; `kernel_input_dtype`) and quantized from those values,
  so the codes equal those of the XLA path (`svdq_jax.qlinear.xla_dot`) for the same input.

  Args:
    x: (..., K) activations, any float dtype and leading batch shape.
    qweight: (N, K // 2) uint8 packed signed INT4 codes (docs/format.md).
    wscales: (K // 64, N) bf16 or f32 weight group scales.
    smooth: (K,) float32 smoothing factors.
    lora_down: (K, r) bfloat16.
    lora_up: (r, N) bfloat16.
    bias: (N,) float32 (layer bias plus SVDQLinear bias) or None.
    group_size: must be 64 (INT4).
    act_shift: 0 for signed activation codes, else unsigned codes of x + act_shift.
    out_dtype: result dtype (x.dtype when None).
    interpret: run the kernels in the Mosaic GPU interpreter (CPU tests); True or explicit
      plgpu.InterpretGPUParams (e.g. with detect_races=True).
    config: block sizes; chosen by `select_config` from (M, K, N) when None.
    apply_gelu: apply tanh-GELU to the result in the GEMM epilogue.

  Returns:
    (..., N) in out_dtype or x.dtype.
  """
  _check_group_size(group_size, "svdq_linear")
  _check_linear_shapes(x, qweight, wscales, smooth, lora_down, lora_up, bias)
  lead, k = x.shape[:-1], x.shape[-1]
  n = qweight.shape[0]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  cfg = config or select_config(m, k, n, lora_down.shape[1])
  m_pad = round_up(max(m, 1), math.lcm(cfg.quantize.block_m, cfg.gemm.block_m))
  k_pad = round_up(k, GROUP_SIZE * math.lcm(cfg.quantize.k_splits, cfg.gemm.groups_per_step))
  codes, ascales_t, lora_act = _padded_quantize(
      x2, smooth, lora_down, act_shift, cfg.quantize, m_pad, k_pad, interpret)
  out = _padded_gemm(
      codes, ascales_t, qweight, wscales, lora_act, lora_up, bias, apply_gelu=apply_gelu,
      out_dtype=jnp.dtype(out_dtype or x.dtype), cfg=cfg.gemm, interpret=interpret)
  return out[:m].reshape(*lead, n)


@functools.partial(
    jax.jit, static_argnames=("group_size", "act_shift", "interpret", "config"))
def quantize_activations(
    x: jax.Array,
    smooth: jax.Array,
    lora_down: jax.Array,
    *,
    group_size: int = GROUP_SIZE,
    act_shift: float = 0.0,
    interpret: bool | plgpu.InterpretGPUParams = False,
    config: QuantizeConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Kernel 1 alone on x (M, K): packed codes (M, K // 2) uint8, ascales (M, K // 64) float32 and
  x @ lora_down (M, r) float32, with docs/format.md semantics (see reference.py)."""
  _check_group_size(group_size, "quantize_activations")
  m, k = x.shape
  if k % GROUP_SIZE or smooth.shape != (k,) or lora_down.shape[0] != k:
    raise ValueError(
        f"quantize_activations: x {x.shape} needs K % 64 == 0, smooth ({k},), lora_down ({k}, r); "
        f"got smooth {smooth.shape}, lora_down {lora_down.shape}")
  cfg = config or select_config(m, k, 64).quantize
  m_pad = round_up(max(m, 1), cfg.block_m)
  k_pad = round_up(k, GROUP_SIZE * cfg.k_splits)
  codes, ascales_t, lora_act = _padded_quantize(
      x, smooth, lora_down, act_shift, cfg, m_pad, k_pad, interpret)
  packed = lax.bitcast_convert_type(codes.reshape(m_pad, -1, 2), jnp.uint8)
  return packed[:m, :k // 2], ascales_t[:k // GROUP_SIZE, :m].T, lora_act[:m, :lora_down.shape[1]]


@functools.partial(
    jax.jit,
    static_argnames=("group_size", "act_shift", "apply_gelu", "out_dtype", "interpret", "config"))
def w4a4_gemm(
    codes: jax.Array,
    ascales: jax.Array,
    qweight: jax.Array,
    wscales: jax.Array,
    lora_act: jax.Array,
    lora_up: jax.Array,
    bias: jax.Array | None,
    *,
    group_size: int = GROUP_SIZE,
    act_shift: float = 0.0,
    apply_gelu: bool = False,
    out_dtype: jnp.dtype = jnp.bfloat16,
    interpret: bool | plgpu.InterpretGPUParams = False,
    config: GemmConfig | None = None,
) -> jax.Array:
  """Kernel 2 alone: (M, K // 2) uint8 codes, (M, G) scales, (N, K // 2) uint8 weights, (G, N)
  scales, (M, r) low-rank activations, (r, N) lora_up and (N,) bias -> (M, N) out_dtype.

  act_shift != 0 means the codes are unsigned (shifted activations)."""
  _check_group_size(group_size, "w4a4_gemm")
  m, k_half = codes.shape
  n = qweight.shape[0]
  k = 2 * k_half
  if (qweight.shape != (n, k_half) or ascales.shape != (m, k // GROUP_SIZE)
      or wscales.shape != (k // GROUP_SIZE, n) or lora_act.shape[0] != m
      or lora_up.shape != (lora_act.shape[1], n) or k % GROUP_SIZE):
    raise ValueError(
        f"w4a4_gemm: inconsistent shapes codes {codes.shape}, ascales {ascales.shape}, qweight "
        f"{qweight.shape}, wscales {wscales.shape}, lora_act {lora_act.shape}, lora_up "
        f"{lora_up.shape}")
  cfg = config or select_config(m, k, n, lora_act.shape[1]).gemm
  m_pad = round_up(max(m, 1), cfg.block_m)
  k_pad = round_up(k, GROUP_SIZE * cfg.groups_per_step)
  codes4 = lax.bitcast_convert_type(
      _pad_to(codes, (m_pad, k_pad // 2)), code_dtype(act_shift != 0.0)).reshape(m_pad, k_pad)
  out = _padded_gemm(
      codes4, _pad_to(ascales.astype(jnp.float32), (m_pad, k_pad // GROUP_SIZE)).T, qweight,
      wscales, _pad_to(lora_act, (m_pad, lora_act.shape[1])), lora_up, bias,
      apply_gelu=apply_gelu, out_dtype=jnp.dtype(out_dtype), cfg=cfg, interpret=interpret)
  return out[:m]


__all__ = ["is_supported", "quantize_activations", "svdq_linear", "unsupported_reason", "w4a4_gemm"]
