"""Bytes per device of the FLUX.1-dev transformer's parameters, replicated or sharded over 1, 2,
4 and 8 devices, in bf16 and svdquant-int4 (shapes only, no weights).

The model is built with `nnx.eval_shape` from its real config (`FluxConfig.dev()`), quantized
abstractly with `quantize_params` (as benchmarks/memory.py), and every array gets the sharding
`models.sharding.weight_shardings` gives it ("fsdp": each array along its largest axis the device
count divides; "channels": the output channels of every linear). The bytes per device come from
those shardings' shard shapes (`models.sharding.bytes_per_device`); the table shows the largest
device's share. The 8 devices are virtual CPU devices; only the shardings matter.

Usage: python benchmarks/sharded_memory.py
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from models import sharding  # noqa: E402
from models.flux import FluxConfig, FluxTransformer  # noqa: E402
from svdq_jax import QuantConfig, quantize_params  # noqa: E402

DEVICE_COUNTS = (1, 2, 4, 8)
MODES = ("replicated", "fsdp", "channels")


def device_bytes(state, count: int, mode: str) -> int:
  """The largest per-device byte count of `state` placed over `count` devices by `mode`."""
  mesh = sharding.data_mesh(count)
  shardings = (jax.tree.map(lambda _: sharding.replicated(mesh), state) if mode == "replicated"
               else sharding.weight_shardings(state, mesh, mode))
  placed = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                        state, shardings)
  return max(sharding.bytes_per_device(placed).values())


def main() -> int:
  argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
  model = nnx.eval_shape(lambda: FluxTransformer(FluxConfig.dev(), param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0)))
  states = {"bf16": nnx.state(model)}
  states["svdquant-int4"] = quantize_params(states["bf16"], None,
                                            QuantConfig.preset("svdquant-int4"), progress=False)
  print("# FLUX.1-dev transformer parameters (FluxConfig.dev(), abstract), GB = 1e9 bytes on the "
        "fullest device")
  header = f"{'weights':15s}{'sharding':12s}" + "".join(f"{f'{n} dev':>10s}"
                                                         for n in DEVICE_COUNTS)
  print(header)
  print("-" * len(header))
  for name, state in states.items():
    for mode in MODES:
      row = [device_bytes(state, n, mode) / 1e9 for n in DEVICE_COUNTS]
      print(f"{name:15s}{mode:12s}" + "".join(f"{v:10.2f}" for v in row))
  print("# Parameters only: activations, the text encoders and the VAE come on top.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
