"""`quantize_linear`: the SVDQuant transform of one linear layer, and `merge_lora`.

For W (K, N) and calibration activations X (T, K) (SVDQuant, Li et al. 2024):
  1. smoothing: λ (K,) is chosen from candidates built from the per-channel activation spans (of
     x + 0.171875 for shifted inputs, see 4.) and weight spans, scored by the layer-output error
     with the low-rank branch and the 4-bit quantization of weights and activations in the loop;
  2. low rank: L = SVD_r(diag(λ) W), refined as L = SVD_r(Ŵ − Q(Ŵ − L)) while the output error
     drops; the rank-r SVD is randomized (3 subspace iterations, exact for small matrices);
  3. the residual Ŵ − L is quantized by round to nearest or GPTQ (on the smoothed inputs);
  4. for inputs that follow a GELU the quantized path sees x + 0.171875 as unsigned INT4, and the
     bias gets the compensation −((0.171875 / λ) @ Q(R)).
Everything between the input checks and the packing is one jitted function of (W, X).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax import quantizers as qz
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError
from svdq_jax.qlinear import SVDQLinear

_OVERSAMPLE = 16
# Power iterations of the randomized SVD. At FLUX.1 shapes with spectra that have no gap after
# rank 32 (benchmarks/svd_quality.py) one iteration left ||W − L1 L2||_F up to 1.3% above the
# Eckart–Young optimum and the layer error up to 1.1% above an exact SVD's; three leave at most
# 0.4% and 0.74% (benchmarks/results/svd_quality_cpu.txt), for four more matmuls of (K, N) by
# (N, 48) and QRs per call.
POWER_ITERS = 3
_MAX_SCORE_TOKENS = 256
_GPTQ_DAMP = 0.01


def _layer(name: str | None) -> str:
  return f"layer {name!r}" if name else "quantize_linear"


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_finite(what: str, x, name: str | None) -> None:
  bad = int(jnp.sum(~jnp.isfinite(jnp.asarray(x)))) if _is_concrete(x) else 0
  if bad:
    raise InputError(f"{_layer(name)}: {what} has {bad} NaN or inf values; it needs finite values")


def low_rank(w: jax.Array, rank: int, key: jax.Array, power_iters: int | None = POWER_ITERS
             ) -> tuple[jax.Array, jax.Array]:
  """Rank-`rank` factors (K, r), (r, N) of w (K, N) in float32, singular values split evenly.

  Randomized range finder with oversampling 16 and `power_iters` power (subspace) iterations
  (Halko et al. 2011); an exact SVD when `power_iters` is None or the matrix is small enough that
  the randomized one would not be cheaper. DeepCompressor takes an exact SVD; at FLUX.1 shapes
  on a loaded 2-core CPU an exact float32 one took 6 to 109 s per call, this one 0.2 to 4.9 s,
  within 0.4% of the optimal residual norm (benchmarks/results/svd_quality_cpu.txt).
  """
  k, n = w.shape
  if power_iters is None or rank + _OVERSAMPLE >= min(k, n):
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  else:
    probe = jax.random.normal(key, (n, rank + _OVERSAMPLE), jnp.float32)
    basis, _ = jnp.linalg.qr(w @ probe)
    for _ in range(power_iters):
      co_basis, _ = jnp.linalg.qr(w.T @ basis)
      basis, _ = jnp.linalg.qr(w @ co_basis)
    u_small, s, vt = jnp.linalg.svd(basis.T @ w, full_matrices=False)
    u = basis @ u_small
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


def _storage_lora(w_smoothed: jax.Array, smooth: jax.Array, rank: int, key: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """lora_down (K, r) and lora_up (r, N) in bf16 as stored, and their product in the smoothed
  domain (K, N) float32 (what the residual must complement). Rank 0: a zero product, written as
  a zero-filled array and never multiplied (XLA CPU mis-simplifies a dot with a zero constant
  under `lax.map`)."""
  k, n = w_smoothed.shape
  if rank == 0:
    empty_down = jnp.zeros((k, 0), jnp.bfloat16)
    return empty_down, jnp.zeros((0, n), jnp.bfloat16), jnp.zeros((k, n), jnp.float32)
  up_left, right = low_rank(w_smoothed, rank, key)
  lora_down = (up_left / smooth[:, None]).astype(jnp.bfloat16)
  lora_up = right.astype(jnp.bfloat16)
  product = (smooth[:, None] * lora_down.astype(jnp.float32)) @ lora_up.astype(jnp.float32)
  return lora_down, lora_up, product


def _rtn(residual: jax.Array, config: QuantConfig) -> qz.Quantized:
  """Round-to-nearest quantization of the residual (K, N): codes (N, K), scales (N, K // group)
  in their storage dtype, the NVFP4 tensor scale (1 for the other formats)."""
  fmt = config.weight_format
  return qz.quantize(residual.T, fmt, config.effective_group(residual.shape[0]),
                     scale_dtype=qz.WEIGHT_SCALE_DTYPE[fmt])


def _residual_values(q: qz.Quantized, config: QuantConfig) -> jax.Array:
  """The float32 values (K, N) of a quantized residual (`_rtn` or `gptq` output)."""
  return qz.dequantize(q, config.weight_format, config.effective_group(q.codes.shape[1])).T


def _weight_fake_quant(residual: jax.Array, config: QuantConfig) -> jax.Array:
  """The residual (K, N) after 4-bit round to nearest, float32."""
  return _residual_values(_rtn(residual, config), config)


def _act_fake_quant(xs: jax.Array, config: QuantConfig, shift: float) -> jax.Array:
  if config.act_format is None:
    return xs
  fmt = "uint4" if shift else config.act_format
  return qz.fake_quantize(xs, fmt, config.effective_group(xs.shape[-1]),
                          scale_dtype=qz.ACT_SCALE_DTYPE[fmt], tensor_scale=1.0)


def _output_error(x: jax.Array, y_ref: jax.Array, w_smoothed: jax.Array, smooth: jax.Array,
                  lora: tuple[jax.Array, jax.Array, jax.Array], config: QuantConfig,
                  shift: float, has_samples: bool) -> jax.Array:
  """Mean squared layer-output error () of the quantized layer (or weight error without data).

  x (T, K) and y_ref = x @ W (T, N) float32; w_smoothed (K, N) = diag(smooth) @ W.
  lora: (lora_down, lora_up, their product in the smoothed domain) from `_storage_lora`; the
  branch's output is computed from the factors, as at inference.
  """
  lora_down, lora_up, lora_product = lora
  residual_q = _weight_fake_quant(w_smoothed - lora_product, config)
  if not has_samples:
    return jnp.mean(jnp.square(w_smoothed - lora_product - residual_q))
  xs = (x + shift) / smooth
  y = _act_fake_quant(xs, config, shift) @ residual_q
  if config.rank:
    y = y + (x @ lora_down.astype(jnp.float32)) @ lora_up.astype(jnp.float32)
  if shift:
    y = y - (shift / smooth) @ residual_q
  return jnp.mean(jnp.square(y - y_ref))


def smooth_candidates(span_x: jax.Array, span_w: jax.Array, alphas: tuple[float, ...]
                      ) -> jax.Array:
  """(1 + 2 * len(alphas), K) smoothing factors: ones, span_x^a and span_x^a / span_w^(1 - a).

  span_x (K,) per-channel max |x + shift| over calibration tokens (`_activation_spans`);
  span_w (K,) per-input-channel max |W|.
  Zero spans count as 1; factors are clipped to [1e-5, 1e5].
  """
  sx = jnp.where(span_x > 0, span_x, 1.0)
  sw = jnp.where(span_w > 0, span_w, 1.0)
  rows = [jnp.ones_like(sx)]
  rows += [sx ** a for a in alphas]
  rows += [sx ** a / sw ** (1 - a) for a in alphas]
  return jnp.clip(jnp.stack(rows), 1e-5, 1e5)


def gptq(residual: jax.Array, xs: jax.Array, config: QuantConfig) -> qz.Quantized:
  """GPTQ (Frantar et al. 2022) of residual (K, N) for inputs xs (T, K), group by group along K.

  A group's scales are taken from the partially updated weights when the group is reached; the
  quantization error of each row is spread over the rows not yet quantized through the Cholesky
  factor of the inverse Hessian (damped by 1% of its mean diagonal).
  Returns codes (N, K), scales (N, K // group) in storage dtype, tensor scale () (as `_rtn`).
  """
  fmt = config.weight_format
  k, n = residual.shape
  group = config.effective_group(k)
  scale_dtype = qz.WEIGHT_SCALE_DTYPE[fmt]
  tensor_scale = qz.nvfp4_tensor_scale(residual) if fmt == "nvfp4" else jnp.float32(1.0)
  hessian = xs.T @ xs / xs.shape[0]
  dead = jnp.diag(hessian) == 0
  damp = _GPTQ_DAMP * jnp.mean(jnp.diag(hessian))
  hessian = hessian + jnp.diag(damp + dead.astype(jnp.float32))
  weights = jnp.where(dead[:, None], 0.0, residual)
  inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(hessian), True), jnp.eye(k))
  upper = jnp.linalg.cholesky(inverse).T
  code_dtype = jnp.int8 if fmt in ("int4", "int8") else jnp.uint8
  index = jnp.arange(group)

  def quantize_group(b, carry):
    weights, codes, scales = carry
    start = b * group
    block = jax.lax.dynamic_slice(weights, (start, 0), (group, n))
    rows_u = jax.lax.dynamic_slice(upper, (start, 0), (group, k))
    block_u = jax.lax.dynamic_slice(rows_u, (0, start), (group, group))
    block_scales = qz.group_scales(block.T[:, None, :], fmt, scale_dtype, tensor_scale)

    def quantize_row(j, inner):
      block, block_codes, errors = inner
      row = block[j][:, None, None]
      code = qz.encode(row, block_scales, fmt, tensor_scale)
      error = (block[j] - qz.decode(code, block_scales, fmt, tensor_scale)[:, 0, 0]) / block_u[j, j]
      block = block - jnp.where(index > j, block_u[j], 0.0)[:, None] * error[None, :]
      return block, block_codes.at[j].set(code[:, 0, 0]), errors.at[j].set(error)

    _, block_codes, errors = jax.lax.fori_loop(
        0, group, quantize_row,
        (block, jnp.zeros((group, n), code_dtype), jnp.zeros((group, n), jnp.float32)))
    later = jnp.arange(k) >= start + group
    weights = weights - jnp.where(later[None, :], rows_u, 0.0).T @ errors
    codes = jax.lax.dynamic_update_slice(codes, block_codes, (start, 0))
    return weights, codes, scales.at[b].set(block_scales[:, 0, 0])

  _, codes, scales = jax.lax.fori_loop(
      0, k // group, quantize_group,
      (weights, jnp.zeros((k, n), code_dtype), jnp.zeros((k // group, n), jnp.float32)))
  return qz.Quantized(codes.T, scales.T.astype(scale_dtype), tensor_scale)


@functools.partial(jax.jit, static_argnames=("config", "shift", "has_samples"))
def _quantize_arrays(kernel, samples, span_x, *, config: QuantConfig, shift: float,
                     has_samples: bool):
  """The jitted transform: a dict of the SVDQLinear arrays (codes unpacked, (N, K)) and, for
  shifted inputs, the shift compensation `shift_bias` (N,)."""
  w = kernel.astype(jnp.float32)
  x = samples.astype(jnp.float32)
  y_ref = x @ w
  key = jax.random.key(config.seed)

  def score(smooth):
    w_smoothed = smooth[:, None] * w
    lora = _storage_lora(w_smoothed, smooth, config.rank, key)
    return _output_error(x, y_ref, w_smoothed, smooth, lora, config, shift, has_samples)

  if config.smooth is not None:
    span_w = jnp.max(jnp.abs(w), axis=1)
    candidates = smooth_candidates(span_x, span_w, config.smooth)
    smooth = candidates[jnp.argmin(jax.lax.map(score, candidates))]
  else:
    smooth = jnp.ones((w.shape[0],), jnp.float32)
  w_smoothed = smooth[:, None] * w

  def error_of(lora):
    return _output_error(x, y_ref, w_smoothed, smooth, lora, config, shift, has_samples)

  lora = _storage_lora(w_smoothed, smooth, config.rank, key)
  if config.rank and config.svd_iters:
    def refine(carry):
      step, lora, error, _ = carry
      target = w_smoothed - _weight_fake_quant(w_smoothed - lora[2], config)
      new_lora = _storage_lora(target, smooth, config.rank, key)
      new_error = error_of(new_lora)
      better = new_error < error
      lora = jax.tree.map(lambda new, old: jnp.where(better, new, old), new_lora, lora)
      return step + 1, lora, jnp.minimum(new_error, error), better

    _, lora, _, _ = jax.lax.while_loop(
        lambda carry: (carry[0] < config.svd_iters) & carry[3], refine,
        (0, lora, error_of(lora), jnp.bool_(True)))
  lora_down, lora_up, lora_product = lora
  residual = w_smoothed - lora_product
  if config.residual == "gptq" and has_samples:
    quantized = gptq(residual, (x + shift) / smooth, config)
  else:
    quantized = _rtn(residual, config)
  out = {"codes": quantized.codes, "wscales": quantized.scales.T,
         "wtscale": quantized.tensor_scale, "smooth": smooth, "lora_down": lora_down,
         "lora_up": lora_up}
  if shift:
    out["shift_bias"] = -((shift / smooth) @ _residual_values(quantized, config))
  return out


def _channel_stat(label: str, stat: jax.Array | None, k: int, name: str | None
                  ) -> jax.Array | None:
  """A per-input-channel calibration statistic as (K,) float32, checked; None stays None."""
  if stat is None:
    return None
  stat = jnp.asarray(stat, jnp.float32)
  if stat.shape != (k,):
    raise InputError(f"{_layer(name)}: {label} has shape {tuple(stat.shape)}, needs ({k},)")
  _check_finite(label, stat, name)
  return stat


def _activation_spans(samples: jax.Array, act_absmax: jax.Array | None,
                      act_max: jax.Array | None, shift: float) -> jax.Array:
  """Per-channel span (K,) float32 of what the quantized path sees, x + shift: the smoothing
  search's span_x.

  DeepCompressor shifts the input before it calibrates anything: `shift_input_activations`
  (app/diffusion/nn/patch.py) wraps the down-projection in a `ShiftedLinear` (nn/patch/linear.py)
  whose inner linear gets x + shift, and that inner linear is the one whose inputs are cached and
  smoothed (app/diffusion/nn/struct.py, `down_proj = layer_2.linear`), so its AbsMax span
  (calib/smooth.py `get_smooth_span`) is max |x + shift|. Shifted inputs are >= -shift, so that
  is max x + shift: exact from `act_max` (K,) over all calibration tokens, else from the samples
  (T, K). Unshifted: `act_absmax` (K,) = max |x|, else from the samples.
  """
  if shift:
    if act_max is not None:
      return act_max + shift
    return jnp.max(jnp.abs(samples.astype(jnp.float32) + shift), axis=0)
  if act_absmax is not None:
    return act_absmax
  return jnp.max(jnp.abs(samples.astype(jnp.float32)), axis=0)


def quantize_linear(kernel: jax.Array, bias: jax.Array | None, act_samples: jax.Array | None,
                    config: QuantConfig, *, act_absmax: jax.Array | None = None,
                    act_max: jax.Array | None = None, act_min: float | None = None,
                    act_shift: float | None = None,
                    name: str | None = None) -> SVDQLinear:
  """Quantizes one linear layer y = x @ kernel + bias with SVDQuant.

  Args:
    kernel: (K, N) float weights (flax layout, in_features first).
    bias: (N,) or None; folded into the result's `bias` (with the shift compensation).
    act_samples: (T, K) calibration activations of this layer's input; needed for smoothing and
      GPTQ (without them the low-rank refinement minimizes the weight error). At most 256 rows
      (a seeded random subset) are used for scoring and GPTQ; the spans and the shift decision
      use all of them.
    config: the layer's QuantConfig (weight_format must not be None).
    act_absmax: (K,) per-channel max |x| of the raw input over all calibration tokens (default:
      from all the samples): the smoothing spans of unshifted inputs.
    act_max: (K,) per-channel max x over all calibration tokens (default: from all the samples):
      with the shift the spans are max x + shift = max |x + shift|, as DeepCompressor
      (`_activation_spans`).
    act_min: the smallest calibration activation (default: from all the samples); decides, with
      `config.shift_activations`, whether the input follows a GELU.
    act_shift: force the activation shift (0 or 0.171875) instead of deciding it from the data.
    name: the layer's path, used in error messages.

  Returns:
    An SVDQLinear whose `dequantize()` approximates kernel and whose `bias` holds bias plus the
    shift compensation (None when both are absent).
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise InputError(f"{_layer(name)}: kernel must be a 2-D float array (K, N), got "
                     f"{kernel.dtype}{tuple(kernel.shape)}")
  if config.weight_format is None:
    raise InputError(f"{_layer(name)}: config has weight_format None (the 16-bit baseline); "
                     "there is nothing to quantize")
  k, n = kernel.shape
  group = config.effective_group(k)
  if k % group or k % 2:
    raise InputError(f"{_layer(name)}: in_features {k} is not a multiple of the group size "
                     f"{group} ({config.weight_format}); skip this layer or pick another group")
  if config.rank > min(k, n):
    raise InputError(f"{_layer(name)}: rank {config.rank} is larger than min(K, N) = "
                     f"{min(k, n)} for kernel {tuple(kernel.shape)}")
  _check_finite("kernel", kernel, name)
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (n,):
      raise InputError(f"{_layer(name)}: bias has shape {tuple(bias.shape)}, needs ({n},)")
    _check_finite("bias", bias, name)
  if act_samples is None:
    if config.needs_calibration_data:
      raise InputError(f"{_layer(name)}: smoothing/GPTQ need calibration activations "
                       f"(act_samples (T, {k})), got None")
    samples = jnp.zeros((1, k), jnp.float32)
  else:
    samples = jnp.asarray(act_samples)
    if (samples.ndim != 2 or samples.shape[1] != k or samples.shape[0] == 0
        or not jnp.issubdtype(samples.dtype, jnp.floating)):
      raise InputError(f"{_layer(name)}: act_samples must be a float array (T, {k}) with T > 0, "
                       f"got {samples.dtype}{tuple(samples.shape)}")
    _check_finite("calibration activations", samples, name)
  act_absmax, act_max = (_channel_stat(label, stat, k, name)
                         for label, stat in (("act_absmax", act_absmax), ("act_max", act_max)))
  if act_shift is None:
    act_shift = 0.0
    if config.shift_activations and config.act_format == "int4":
      if act_min is None and act_samples is not None:
        if not _is_concrete(samples):
          raise InputError(f"{_layer(name)}: under jax.jit pass act_shift or act_min (whether "
                           "the input follows a GELU cannot be read from traced samples)")
        act_min = float(jnp.min(samples))
      if act_min is not None and act_min >= -qz.GELU_SHIFT:
        act_shift = qz.GELU_SHIFT
  elif act_shift not in (0.0, qz.GELU_SHIFT) or (act_shift and config.act_format != "int4"):
    raise InputError(f"{_layer(name)}: act_shift must be 0 or {qz.GELU_SHIFT} (INT4 activations "
                     f"only), got {act_shift} with act_format {config.act_format!r}")

  span_x = _activation_spans(samples, act_absmax, act_max, float(act_shift))
  # The spans and the shift decision above saw every row; scoring and GPTQ use at most 256.
  if samples.shape[0] > _MAX_SCORE_TOKENS:
    picks = np.random.default_rng(config.seed).choice(samples.shape[0], _MAX_SCORE_TOKENS,
                                                      replace=False)
    samples = samples[np.sort(picks)]
  out = _quantize_arrays(kernel, samples, span_x, config=config, shift=float(act_shift),
                         has_samples=act_samples is not None)
  qweight = out["codes"] if config.weight_format == "int8" else qz.pack_nibbles(out["codes"])
  folded = None
  if bias is not None:
    folded = bias.astype(jnp.float32)
  if "shift_bias" in out:
    folded = out["shift_bias"] if folded is None else folded + out["shift_bias"]
  return SVDQLinear(qweight=qweight, wscales=out["wscales"], wtscale=out["wtscale"],
                    smooth=out["smooth"], lora_down=out["lora_down"], lora_up=out["lora_up"],
                    bias=folded, format=config.layer_format(k, float(act_shift)),
                    in_features=k, out_features=n)


def merge_lora(w: SVDQLinear | jax.Array, lora_down: jax.Array, lora_up: jax.Array,
               scale: float = 1.0) -> SVDQLinear | jax.Array:
  """Adds a LoRA (x @ lora_down @ lora_up * scale) to a layer without re-quantizing it.

  For an SVDQLinear the LoRA joins the low-rank branch (ranks concatenated, `scale` folded into
  the new up rows, stored in the branch's dtype, bf16); the 4-bit residual, scales and smooth are
  unchanged (lora_down acts on the raw x, so no smoothing adjustment is needed). For a plain
  kernel (K, N) the product is added to it.

  Args:
    w: an SVDQLinear or a kernel (K, N).
    lora_down: (K, r) (diffusers' lora_A transposed).
    lora_up: (r, N) (lora_B transposed).
    scale: the LoRA strength (alpha / r times the user's weight).

  Returns:
    The SVDQLinear with rank r_old + r, or the kernel (K, N) in its own dtype.
  """
  k, n = w.shape
  lora_down = jnp.asarray(lora_down)
  lora_up = jnp.asarray(lora_up)
  if (lora_down.ndim != 2 or lora_up.ndim != 2 or lora_down.shape[0] != k
      or lora_up.shape[1] != n or lora_down.shape[1] != lora_up.shape[0]):
    raise ValueError(f"merge_lora: layer is ({k}, {n}); needs lora_down (K={k}, r) and lora_up "
                     f"(r, N={n}), got {tuple(lora_down.shape)} and {tuple(lora_up.shape)}")
  if not isinstance(w, SVDQLinear):
    return w + (scale * (lora_down.astype(jnp.float32) @ lora_up.astype(jnp.float32))).astype(
        w.dtype)
  down = jnp.concatenate([w.lora_down, lora_down.astype(w.lora_down.dtype)], axis=1)
  up = jnp.concatenate([w.lora_up, (scale * lora_up.astype(jnp.float32)).astype(w.lora_up.dtype)],
                       axis=0)
  return dataclasses.replace(w, lora_down=down, lora_up=up)
