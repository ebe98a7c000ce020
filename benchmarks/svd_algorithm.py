"""CPU time of one thin SVD by LAPACK's divide and conquer (gesdd, `jnp.linalg.svd`'s default,
what `svdq_jax.transform.low_rank` calls) and by the QR algorithm (gesvd), on the matrices the
smoothing search factors: the (rank + 16, N) projection of the randomized SVD and small exact ones.

CPU time (`time.process_time`, all threads) rather than wall time, since the machine is shared:
a threaded OpenBLAS that waits for busy cores burns CPU time. Run it with and without
OPENBLAS_NUM_THREADS=1 (read when the library loads; the `svdq-jax` command sets it).

Usage: python benchmarks/svd_algorithm.py [--shapes 48x128,48x512,128x128] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def cpu_seconds(fn, a: jax.Array, calls: int) -> float:
  """CPU seconds per call of a compiled fn(a), after one warm-up call."""
  jax.block_until_ready(fn(a))
  start = time.process_time()
  for _ in range(calls):
    jax.block_until_ready(fn(a))
  return (time.process_time() - start) / calls


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="48x128,48x512,128x128")
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args()
  print(f"# svd_algorithm: jax {jax.__version__} on {jax.default_backend()} "
        f"({platform.machine()}), {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}, OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
  print("| shape | gesdd ms CPU | gesvd (QR) ms CPU | ratio |")
  print("|---|---:|---:|---:|")
  default = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False))
  qr = jax.jit(lambda a: jax.lax.linalg.svd(a, full_matrices=False,
                                             algorithm=jax.lax.linalg.SvdAlgorithm.QR))
  rng = np.random.default_rng(0)
  for shape in args.shapes.split(","):
    m, n = (int(v) for v in shape.split("x"))
    a = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    slow, fast = cpu_seconds(default, a, args.calls), cpu_seconds(qr, a, args.calls)
    print(f"| {m}x{n} | {slow * 1e3:.2f} | {fast * 1e3:.2f} | {slow / fast:.1f} |", flush=True)


if __name__ == "__main__":
  main()
