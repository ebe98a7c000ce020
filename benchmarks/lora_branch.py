"""Where a LoRA goes on a quantized layer: concatenated onto the low-rank branch, or a separate one.

"concat" (what `svdq_jax.lora.apply_loras` does, Nunchaku's way): the LoRA's factors join the
layer's rank-32 branch, so `svdq_dot` runs one branch of rank 32 + r; a new strength re-runs the
concatenation (the "apply" column). "separate": `svdq_dot` of the base layer plus
`strength * (x @ A) @ B` in float32, a second branch outside the quantized product (what a
separate branch in the layer would compute on the XLA path).

Part 1 times both on the XLA path (jitted; the fastest of --repeats alternating runs after a
warm-up) for each W4A4 linear shape of FLUX.1 (K x N: 3072x3072 attention projections,
3072x12288 MLP up and proj_mlp, 12288x3072 MLP down, 15360x3072 single-block proj_out) with
--tokens tokens, and sums them, weighted by how often each shape runs per transformer call
(19 double and 38 single blocks), into a time per step. Layers are random SVDQLinears (the
product's cost does not depend on the values); the AdaLN linears (W4A16) and 16-bit layers are
left out (a LoRA changes their 16-bit kernel, the same either way).

Part 2 is the GPU kernel's rank limit, from its own resource accounting
(`pallas_kernels.svdq_linear.config`): kernel 1 computes x @ lora_down in one wgmma of N = rank
(at most MAX_RANK), kernel 2 keeps the hi/lo low-rank operands (block, 2 * padded rank) in shared
memory; a rank fits when the config `select_config` picks for FLUX.1's shapes at 4096 + 512 tokens
stays within the per-CTA limit. A separate branch has no such limit but runs outside the fused
kernel: it reads x again and reads and writes y once more per layer (the extra bytes per step are
printed, counted, not measured).

Usage: python benchmarks/lora_branch.py [--tokens 64] [--ranks 16,64,128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.svdq_linear import config as kconfig
from svdq_jax import QuantConfig
from svdq_jax.lora import LayerLoRA, apply_loras
from svdq_jax.qlinear import SVDQLinear, expected_shapes, xla_dot

# (K, N): count per FLUX.1 transformer call (19 double blocks, 38 single blocks).
FLUX_W4A4 = {
    (3072, 3072): 19 * 8 + 38 * 3,  # to_q/k/v, add_q/k/v, to_out, to_add_out; single q/k/v
    (3072, 12288): 19 * 2 + 38,  # ff / ff_context net.0.proj; single proj_mlp
    (12288, 3072): 19 * 2,  # ff / ff_context net.2
    (15360, 3072): 38,  # single proj_out
}
BASE_RANK = 32
GPU_TOKENS = 4096 + 512  # FLUX.1 at 1024 x 1024: image + text tokens


def random_layer(k: int, n: int, rank: int, seed: int) -> SVDQLinear:
  """An SVDQLinear (svdquant-int4 format) with random arrays of the right shapes and dtypes."""
  config = QuantConfig.preset()
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, spec in expected_shapes(config.layer_format(k), k, n, rank, has_bias=False).items():
    if name == "qweight":
      arrays[name] = jnp.asarray(rng.integers(0, 256, spec.shape, dtype=np.uint8))
    elif name == "wtscale":
      arrays[name] = jnp.ones((), jnp.float32)
    elif name == "smooth":
      arrays[name] = jnp.asarray(rng.uniform(0.5, 2.0, spec.shape), jnp.float32)
    else:
      arrays[name] = jnp.asarray(rng.standard_normal(spec.shape) * 0.02, spec.dtype)
  return SVDQLinear(**arrays, bias=None, format=config.layer_format(k), in_features=k,
                    out_features=n)


def random_lora(k: int, n: int, rank: int, seed: int) -> LayerLoRA:
  rng = np.random.default_rng(seed)
  return LayerLoRA(jnp.asarray(rng.standard_normal((k, rank)) / np.sqrt(k), jnp.bfloat16),
                   jnp.asarray(rng.standard_normal((rank, n)) * 0.01, jnp.bfloat16), 1.0)


def timed(calls: dict[str, tuple], repeats: int) -> dict[str, float]:
  """Fastest seconds of each `fn(*args)` of `calls` ({name: (fn, *args)}, blocked until ready)
  over `repeats` rounds after one warm-up; the calls alternate within each round, so that a
  load change on a shared machine hits all of them alike."""
  for fn, *args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, *args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


@jax.jit
def concat_dot(x, w):
  return xla_dot(x, w)


@jax.jit
def separate_dot(x, w, loras, strengths):
  y = xla_dot(x, w).astype(jnp.float32)
  xf = x.astype(jnp.float32)
  for strength, lora in zip(strengths, loras, strict=True):
    down = lora.lora_down.astype(jnp.float32)
    up = lora.lora_up.astype(jnp.float32)
    y = y + (strength * lora.scale) * ((xf @ down) @ up)
  return y.astype(x.dtype)


@jax.jit
def apply_one(params, adapters, strengths):
  return apply_loras(params, adapters, strengths)


def xla_rows(tokens: int, lora_sets: list[tuple[int, ...]], repeats: int) -> list[str]:
  """Per LoRA set: per-step seconds of base / concat / separate, and of one strength change."""
  totals = {ranks: {"concat": 0.0, "separate": 0.0, "apply": 0.0} for ranks in lora_sets}
  base_total = 0.0
  rows = []
  x_key = jax.random.key(0)
  for (k, n), count in FLUX_W4A4.items():
    x = jax.random.normal(x_key, (tokens, k), jnp.bfloat16)
    base = random_layer(k, n, BASE_RANK, seed=k + n)
    calls = {"base": (concat_dot, x, base)}
    for ranks in lora_sets:
      loras = [random_lora(k, n, r, seed=i) for i, r in enumerate(ranks)]
      strengths = jnp.ones((len(ranks),), jnp.float32)
      adapters = [{"kernel": lora} for lora in loras]
      merged = apply_one({"kernel": base}, adapters, strengths)["kernel"]
      calls[(ranks, "concat")] = (concat_dot, x, merged)
      calls[(ranks, "separate")] = (separate_dot, x, base, loras, strengths)
      calls[(ranks, "apply")] = (apply_one, {"kernel": base}, adapters, strengths)
    t = timed(calls, repeats)
    base_total += count * t["base"]
    cells = [f"{k}x{n} (x{count}): base {1e3 * t['base']:7.1f} ms"]
    for ranks in lora_sets:
      for variant in ("concat", "separate", "apply"):
        totals[ranks][variant] += count * t[(ranks, variant)]
      cells.append(f"r={'+'.join(map(str, ranks))}: concat {1e3 * t[(ranks, 'concat')]:7.1f} "
                   f"separate {1e3 * t[(ranks, 'separate')]:7.1f}")
    rows.append(" | ".join(cells))
  rows.append("")
  rows.append(f"{'LoRA ranks':<12} {'base s/step':>12} {'concat s/step':>14} "
              f"{'separate s/step':>16} {'concat/base':>12} {'separate/base':>14} "
              f"{'strength change s':>18}")
  for ranks, t in totals.items():
    rows.append(f"{'+'.join(map(str, ranks)):<12} {base_total:12.2f} {t['concat']:14.2f} "
                f"{t['separate']:16.2f} {t['concat'] / base_total:12.3f} "
                f"{t['separate'] / base_total:14.3f} {t['apply']:18.3f}")
  return rows


def fits_kernel(rank: int) -> tuple[bool, str]:
  """Whether a branch of `rank` fits both kernels at every FLUX.1 shape, and why not."""
  if rank > kconfig.MAX_RANK:
    return False, f"kernel 1: rank > MAX_RANK {kconfig.MAX_RANK}"
  worst = 0
  for k, n in FLUX_W4A4:
    cfg = kconfig.select_config(GPU_TOKENS, k, n, rank)
    worst = max(worst, kconfig.gemm_smem_bytes(cfg.gemm, 2 * kconfig.padded_rank(rank)))
  if worst > kconfig.H100_SMEM_BYTES:
    return False, f"kernel 2: {worst} B SMEM > {kconfig.H100_SMEM_BYTES} B per CTA"
  return True, f"kernel 2: {worst} B SMEM"


def kernel_rows(lora_sets: list[tuple[int, ...]]) -> list[str]:
  rows = [f"{'LoRA ranks':<12} {'branch rank':>11} {'padded':>7}  concat fits the kernel?"]
  for ranks in lora_sets:
    rank = BASE_RANK + sum(ranks)
    ok, why = fits_kernel(rank)
    rows.append(f"{'+'.join(map(str, ranks)):<12} {rank:11d} {kconfig.padded_rank(rank):7d}  "
                f"{'yes' if ok else 'NO '} ({why})")
  largest = max(r for r in range(1, kconfig.MAX_RANK + 1) if fits_kernel(r)[0])
  rows.append(f"largest branch rank that fits: {largest} (LoRA ranks up to {largest - BASE_RANK} "
              f"in total on a rank-{BASE_RANK} model)")
  extra = sum(count * 2 * (GPU_TOKENS * k + 2 * GPU_TOKENS * n)
              for (k, n), count in FLUX_W4A4.items())
  rows.append(f"separate branch outside the kernel: x read again, y read and written again "
              f"(bf16): {extra / 1e9:.2f} GB more memory traffic per step at {GPU_TOKENS} tokens")
  return rows


def parse_ranks(text: str) -> list[tuple[int, ...]]:
  """"16,64,128" -> one LoRA per rank, plus two LoRAs of the middle rank ("64+64")."""
  try:
    ranks = [int(r) for r in text.split(",")]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"ranks must look like 16,64,128; got {text!r}") from e
  if not ranks or min(ranks) < 1:
    raise argparse.ArgumentTypeError(f"ranks must be positive; got {text!r}")
  middle = ranks[len(ranks) // 2]
  return [(r,) for r in ranks] + [(middle, middle)]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=64, help="tokens per layer call (XLA part)")
  parser.add_argument("--ranks", type=parse_ranks, default=parse_ranks("16,64,128"),
                      help="LoRA ranks, comma-separated (two LoRAs of the middle one are added)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f"# lora_branch: jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}), {args.tokens} tokens, base rank "
        f"{BASE_RANK}, fastest of {args.repeats}", flush=True)
  print("# part 1: XLA path, W4A4 layers of one FLUX.1 transformer call", flush=True)
  for row in xla_rows(args.tokens, args.ranks, args.repeats):
    print(row, flush=True)
  print(f"# part 2: GPU kernel rank limit (its SMEM accounting, {GPU_TOKENS} tokens)")
  for row in kernel_rows(args.ranks):
    print(row)
  print(f"# total {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
