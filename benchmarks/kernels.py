"""Times the fused SVDQuant INT4 linear against XLA baselines on FLUX.1 layer shapes (Hopper only).

Run on an H100/H200 with `python benchmarks/kernels.py [--output benchmarks/results/...]`. Rows:

  bf16 dot      XLA bf16 linear `x @ w + bias` with a bf16 (K, N) weight, bf16 out (the layer
                the quantized one replaces)
  int8 dot      XLA int8 x int8 -> int32 `dot_general` (activations and weights pre-quantized,
                no scales or bias, int32 out): the integer tensor-core roofline XLA reaches
  W4A16         XLA: int4 weights dequantized to bf16 (unpack, group scales) in the jit, bf16
                dot plus bias
  unfused       our kernels without the fusion: kernel 1 quantizes only (rank 0), kernel 2 is the
                plain W4A4 GEMM (rank 0), and the low-rank branch is two separate XLA matmuls
                (x @ lora_down) @ lora_up that re-read x, added afterwards
  fused         `svdq_linear`: kernel 1 with x @ lora_down fused, kernel 2 with the up-projection
                and bias in its epilogue (two launches)
  fused r=0     the same without the low-rank branch, to get the branch's share of the fused time

All rows of a line use the same (M, K, N) and bf16 activations. Each figure is the median over
`--iters` samples of the time per call, a sample being `--calls` back-to-back calls followed by one
`block_until_ready` (after `--warmup` untimed calls that compile and autotune), so that host
dispatch overlaps device work instead of adding its latency to every call. The weights are
re-read on every call, so layers whose weights fit in the 50 MB L2 (3072 x 3072: 18.9 MB bf16,
4.7 MB INT4) are measured L2-warm, for every row alike. TFLOP/s counts 2*M*K*N (the low-rank
flops are not counted); `speedup` is bf16 time / fused time, `vs W4A16` is W4A16 time / fused
time.

The fused output is checked against the jnp reference before it is timed; a relative error above
REL_TOL marks the line WRONG and makes the script exit 1. On a machine without a supported GPU the
script says so and exits 0; it never prints invented numbers. `--interpret` runs one tiny
shape through the Mosaic GPU interpreter on CPU to smoke-test the script (its times mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.svdq_linear import (
    is_supported,
    quantize_activations,
    svdq_linear,
    svdq_linear_reference,
    unpack_int4,
    w4a4_gemm,
)

TOKENS = (256, 1024, 4096)
LAYERS = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))
RANK = 32
REL_TOL = 1e-2
"""Bound on max |fused - reference| / max |reference| (bf16 output rounding is about 4e-3)."""


def time_us(fn, *args, iters: int, calls: int, warmup: int, **kwargs) -> float:
  """Median device time per call of `fn(*args, **kwargs)` in microseconds.

  `warmup` calls first (compilation, autotuning), then `iters` samples of `calls` back-to-back
  calls with a single `block_until_ready` at the end of each.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args, **kwargs))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    out = [fn(*args, **kwargs) for _ in range(calls)]
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e6 / calls)
  return statistics.median(samples)


def make_layer(m: int, k: int, n: int, rank: int, seed: int = 0) -> dict[str, jax.Array]:
  """Random operands of one quantized linear in the docs/format.md layout, on the default device."""
  rng = np.random.default_rng(seed)
  return dict(
      x=jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16),
      qweight=jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8),
      wscales=jnp.asarray(rng.uniform(0.005, 0.02, (k // 64, n)), jnp.bfloat16),
      smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
      lora_down=jnp.asarray(rng.standard_normal((k, rank)) * 0.05, jnp.bfloat16),
      lora_up=jnp.asarray(rng.standard_normal((rank, n)) * 0.05, jnp.bfloat16),
      bias=jnp.asarray(rng.standard_normal(n), jnp.float32),
  )


@jax.jit
def bf16_dot(x, w, bias):
  return jnp.dot(x, w) + bias.astype(jnp.bfloat16)


@jax.jit
def int8_dot(xq, wq):
  return lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


@jax.jit
def w4a16(x, qweight, wscales, bias):
  k = x.shape[1]
  codes = unpack_int4(qweight).reshape(qweight.shape[0], k // 64, 64).astype(jnp.bfloat16)
  w = (codes * wscales.T[:, :, None]).reshape(qweight.shape[0], k)
  return lax.dot_general(x, w, (((1,), (1,)), ((), ()))) + bias.astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames="interpret")
def unfused(x, qweight, wscales, smooth, lora_down, lora_up, bias, interpret=False):
  no_rank = jnp.zeros((x.shape[1], 0), jnp.bfloat16)
  codes, ascales, _ = quantize_activations(x, smooth, no_rank, interpret=interpret)
  y = w4a4_gemm(codes, ascales, qweight, wscales, jnp.zeros((x.shape[0], 0), jnp.float32),
                jnp.zeros((0, qweight.shape[0]), jnp.bfloat16), bias, out_dtype=jnp.float32,
                interpret=interpret)
  low_rank = jnp.dot(jnp.dot(x, lora_down), lora_up, preferred_element_type=jnp.float32)
  return (y + low_rank).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames="interpret")
def fused(x, qweight, wscales, smooth, lora_down, lora_up, bias, interpret=False):
  return svdq_linear(x, qweight, wscales, smooth, lora_down, lora_up, bias, interpret=interpret)


def check_against_reference(layer: dict[str, jax.Array], interpret: bool) -> float:
  """Max |fused - reference| / max |reference|: the kernels must be right before they are timed."""
  got = np.asarray(fused(*layer.values(), interpret=interpret), np.float32)
  want = np.asarray(svdq_linear_reference(**layer, out_dtype=jnp.float32))
  return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=20, help="timed samples per figure (median)")
  parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per sample")
  parser.add_argument("--warmup", type=int, default=3, help="untimed calls before the samples")
  parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
  parser.add_argument("--output", help="also write the table to this file")
  parser.add_argument("--interpret", action="store_true",
                      help="CPU smoke test: one tiny shape in the Mosaic GPU interpreter")
  args = parser.parse_args(argv)
  layers = LAYERS
  if args.interpret:
    args.tokens, layers, args.iters, args.calls, args.warmup = [64], ((128, 128),), 1, 1, 1
  elif not is_supported():
    devices = ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
    print(f"benchmarks/kernels.py: needs a Hopper (sm_90) GPU with the Mosaic GPU backend; found "
          f"{devices}. No figures measured.")
    return 0

  device = jax.devices()[0]
  lines = [f"# {device.device_kind}, jax {jax.__version__}, rank {RANK}, microseconds per call: "
           f"median of {args.iters} samples of {args.calls} back-to-back calls"]
  if args.interpret:
    lines.append("# interpret mode on CPU: a smoke test, the times below are not kernel timings")
  header = (f"{'M':>5} {'K':>6} {'N':>6} | {'bf16 dot':>9} {'int8 dot':>9} {'W4A16':>9} "
            f"{'unfused':>9} {'fused':>9} {'fused r0':>9} | {'bf16 TF/s':>9} {'fused TF/s':>10} "
            f"{'speedup':>7} {'vs W4A16':>8} {'lowrank%':>8} {'rel.err':>8}")
  lines.append(header)
  print("\n".join(lines), flush=True)
  all_correct = True
  for m in args.tokens:
    for k, n in layers:
      layer = make_layer(m, k, n, RANK)
      no_rank = dict(layer, lora_down=layer["lora_down"][:, :0], lora_up=layer["lora_up"][:0])
      w_bf16 = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.bfloat16)
      rel_err = check_against_reference(layer, args.interpret)
      all_correct &= rel_err <= REL_TOL
      timed = functools.partial(time_us, iters=args.iters, calls=args.calls, warmup=args.warmup)
      xq = jnp.asarray(np.random.default_rng(2).integers(-8, 8, (m, k)), jnp.int8)
      wq = jnp.asarray(np.random.default_rng(3).integers(-8, 8, (n, k)), jnp.int8)
      t = dict(
          bf16=timed(bf16_dot, layer["x"], w_bf16, layer["bias"]),
          int8=timed(int8_dot, xq, wq),
          w4a16=timed(w4a16, layer["x"], layer["qweight"], layer["wscales"], layer["bias"]),
          unfused=timed(unfused, *layer.values(), interpret=args.interpret),
          fused=timed(fused, *layer.values(), interpret=args.interpret),
          fused_r0=timed(fused, *no_rank.values(), interpret=args.interpret),
      )
      flops = 2 * m * k * n
      share = max(t["fused"] - t["fused_r0"], 0.0) / t["fused"]
      line = (f"{m:>5} {k:>6} {n:>6} | {t['bf16']:>9.1f} {t['int8']:>9.1f} {t['w4a16']:>9.1f} "
              f"{t['unfused']:>9.1f} {t['fused']:>9.1f} {t['fused_r0']:>9.1f} | "
              f"{flops / t['bf16'] / 1e6:>9.1f} {flops / t['fused'] / 1e6:>10.1f} "
              f"{t['bf16'] / t['fused']:>6.2f}x {t['w4a16'] / t['fused']:>7.2f}x "
              f"{100 * share:>7.1f}% {rel_err:>8.1e}" + ("" if rel_err <= REL_TOL else " WRONG"))
      lines.append(line)
      print(line, flush=True)
  if args.output:
    with open(args.output, "w") as f:
      f.write("\n".join(lines) + "\n")
  if not all_correct:
    print(f"benchmarks/kernels.py: fused output off the reference by more than {REL_TOL} on the "
          "lines marked WRONG", file=sys.stderr)
  return 0 if all_correct else 1


if __name__ == "__main__":
  sys.exit(main())
