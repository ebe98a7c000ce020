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

`--sweep` times the fused linear at M = 4096 (or `--tokens`) for every layer shape with kernel 2
configurations that differ from `select_config`'s in one or two fields (`sweep_configs`: block_n,
groups_per_step, carrier, magic_int_to_float, max_concurrent_steps, manual_barriers), each checked
against the reference first. Configs whose accumulators exceed ACCUMULATOR_REGISTER_BUDGET are
timed and marked `spills`; those over the H100's shared memory are listed as not run; one that
fails to compile or run is listed as FAILED with its error (the sweep goes on, and exits 1).
`vs bf16` is the XLA bf16 dot's time over the config's (above 1 is faster), measured in the same
run; `*` marks the fastest correct config of each shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.svdq_linear import (
    GemmConfig,
    SVDQLinearConfig,
    is_supported,
    quantize_activations,
    select_config,
    svdq_linear,
    svdq_linear_reference,
    unpack_int4,
    w4a4_gemm,
)
from pallas_kernels.svdq_linear.config import (
    ACCUMULATOR_REGISTER_BUDGET,
    H100_SMEM_BYTES,
    gemm_accumulator_registers,
    gemm_smem_bytes,
    padded_rank,
)

TOKENS = (256, 1024, 4096)
SWEEP_TOKENS = (4096,)
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


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def fused(x, qweight, wscales, smooth, lora_down, lora_up, bias, interpret=False, config=None):
  return svdq_linear(x, qweight, wscales, smooth, lora_down, lora_up, bias, interpret=interpret,
                     config=config)


def check_against_reference(layer: dict[str, jax.Array], interpret: bool,
                            config: SVDQLinearConfig | None = None,
                            want: np.ndarray | None = None) -> float:
  """Max |fused - reference| / max |reference|: the kernels must be right before they are timed.
  `want` is the f32 reference output when already computed (the sweep reuses it per shape)."""
  got = np.asarray(fused(*layer.values(), interpret=interpret, config=config), np.float32)
  if want is None:
    want = np.asarray(svdq_linear_reference(**layer, out_dtype=jnp.float32))
  return float(np.abs(got - want).max() / np.abs(want).max())


def sweep_configs(base: GemmConfig) -> list[GemmConfig]:
  """Kernel 2 configs around `base` (11 for select_config's 64 x 128 tile): each field varied
  on its own, block_n with groups_per_step lowered or raised so that the accumulators stay near
  the register budget (64 x 256 still spills; 64 x 128 with four groups, which spills too, is
  left out to save its compile time); duplicates of `base` dropped, `base` first."""
  variants = [
      {},
      {"block_n": 64}, {"block_n": 64, "groups_per_step": 4},
      {"block_n": 256, "groups_per_step": 1}, {"groups_per_step": 1},
      {"carrier": "e4m3"}, {"magic_int_to_float": not base.magic_int_to_float},
      *({"max_concurrent_steps": steps} for steps in (2, 3, 4)),
      {"manual_barriers": True}, {"manual_barriers": True, "groups_per_step": 1},
  ]
  configs = []
  for fields in variants:
    config = dataclasses.replace(base, **fields)
    if config not in configs:
      configs.append(config)
  return configs


def describe(config: GemmConfig) -> str:
  """The config fields the sweep varies, in table columns (magic only applies to s8)."""
  magic = "-" if config.carrier != "s8" else "on" if config.magic_int_to_float else "off"
  return (f"{config.block_m:>3}x{config.block_n:<3} {config.groups_per_step:>3} "
          f"{config.carrier:>4} {magic:>5} "
          f"{config.max_concurrent_steps:>3} {'manual' if config.manual_barriers else 'auto':>6}")


def run_sweep(args: argparse.Namespace, layers: tuple[tuple[int, int], ...],
              timed: Callable[..., float]) -> tuple[list[str], bool]:
  """The `--sweep` table: per (M, K, N) the XLA bf16 dot, then each config of `sweep_configs`
  (checked, then timed); returns the lines and whether every config ran and was correct.
  `layers` holds the (K, N) shapes, `timed` is time_us with the run's sample counts."""
  lines = [f"{'M':>5} {'K':>6} {'N':>6} | {'tile':>7} {'gps':>3} {'carr':>4} {'magic':>5} "
           f"{'mcs':>3} {'sync':>6} | {'regs':>4} {'smem KiB':>8} | {'us':>9} {'vs bf16':>7} "
           f"{'rel.err':>8}"]
  print(lines[0], flush=True)
  all_correct = True
  for m in args.tokens:
    for k, n in layers:
      layer = make_layer(m, k, n, RANK)
      w_bf16 = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.bfloat16)
      bf16_us = timed(bf16_dot, layer["x"], w_bf16, layer["bias"])
      want = np.asarray(svdq_linear_reference(**layer, out_dtype=jnp.float32))
      chosen = select_config(m, k, n, RANK)
      if args.interpret:
        configs = [chosen.gemm, GemmConfig(64, 128, 2, groups_per_step=1, manual_barriers=True)]
      else:
        configs = sweep_configs(chosen.gemm)
      rows = []
      for gemm in configs:
        head = f"{m:>5} {k:>6} {n:>6} | {describe(gemm)} | "
        regs = gemm_accumulator_registers(gemm)
        smem = gemm_smem_bytes(gemm, 2 * padded_rank(RANK))
        head += f"{regs:>4} {smem / 1024:>8.1f} | "
        if smem > H100_SMEM_BYTES:
          rows.append((None, head + "not run: over the H100's shared memory"))
          continue
        config = SVDQLinearConfig(quantize=chosen.quantize, gemm=gemm)
        try:
          rel_err = check_against_reference(layer, args.interpret, config, want)
          us = timed(fused, *layer.values(), interpret=args.interpret, config=config)
        except Exception as error:  # one config's failure must not end the sweep
          all_correct = False
          first_line = (str(error).strip().splitlines() or [""])[0][:200]
          rows.append((None, head + f"FAILED: {type(error).__name__}: {first_line}"))
          print(f"# sweep progress: {rows[-1][1]}", file=sys.stderr, flush=True)
          continue
        correct = rel_err <= REL_TOL
        all_correct &= correct
        notes = ("" if correct else " WRONG") + (
            " spills" if regs > ACCUMULATOR_REGISTER_BUDGET else "")
        rows.append((us if correct else None,
                     head + f"{us:>9.1f} {bf16_us / us:>6.2f}x {rel_err:>8.1e}" + notes))
        # Each row as it is measured, so that a run stopped by a time limit keeps them.
        print(f"# sweep progress: {rows[-1][1]}", file=sys.stderr, flush=True)
      correct_times = [(us, i) for i, (us, _) in enumerate(rows) if us is not None]
      best = min(correct_times)[1] if correct_times else None
      block = [f"{m:>5} {k:>6} {n:>6} | {'XLA bf16 dot':<33} | {'':>13} | {bf16_us:>9.1f}"]
      block += [line + (" *" if i == best else "") for i, (_, line) in enumerate(rows)]
      print("\n".join(block), flush=True)
      lines += block
  return lines, all_correct


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=20, help="timed samples per figure (median)")
  parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per sample")
  parser.add_argument("--warmup", type=int, default=3, help="untimed calls before the samples")
  parser.add_argument("--tokens", type=int, nargs="*",
                      help=f"token counts M (default {TOKENS}, with --sweep {SWEEP_TOKENS})")
  parser.add_argument("--output", help="also write the table to this file")
  parser.add_argument("--sweep", action="store_true",
                      help="time kernel 2 config variants per layer shape instead")
  parser.add_argument("--interpret", action="store_true",
                      help="CPU smoke test: one tiny shape in the Mosaic GPU interpreter")
  args = parser.parse_args(argv)
  layers = LAYERS
  if args.tokens is None:
    args.tokens = list(SWEEP_TOKENS if args.sweep else TOKENS)
  if args.interpret:
    args.tokens, args.iters, args.calls, args.warmup = [64], 1, 1, 1
    layers = ((256, 128),) if args.sweep else ((128, 128),)
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
  timed = functools.partial(time_us, iters=args.iters, calls=args.calls, warmup=args.warmup)
  if args.sweep:
    lines.append("# kernel 2 config sweep around select_config's choice (first row of a shape); "
                 "* = fastest correct")
    print("\n".join(lines), flush=True)
    table, all_correct = run_sweep(args, layers, timed)
    return finish(args, lines + table, all_correct)
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
  return finish(args, lines, all_correct)


def finish(args: argparse.Namespace, lines: list[str], all_correct: bool) -> int:
  """Writes the table to --output if asked; the exit status: 1 when a checked line was WRONG."""
  if args.output:
    with open(args.output, "w") as f:
      f.write("\n".join(lines) + "\n")
  if not all_correct:
    print(f"benchmarks/kernels.py: fused output off the reference by more than {REL_TOL} on the "
          "lines marked WRONG", file=sys.stderr)
  return 0 if all_correct else 1


if __name__ == "__main__":
  sys.exit(main())
