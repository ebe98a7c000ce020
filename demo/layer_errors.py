"""A small real quantization: every preset on two layers with planted outliers, printed as a table.

`svdq-jax demo` runs this until the full text-to-image demo exists; benchmarks/quant_error.py
prints the same table at FLUX.1's layer shapes.
"""

from __future__ import annotations

import time

from svdq_jax.evaluation import ALL_PRESETS, LayerSpec, error_table, format_table

# Two layers of one shape (so every preset compiles once): a projection whose inputs carry
# channel-wise outliers, and a second, independently drawn one.
DEMO_LAYERS = (LayerSpec("layer A 256x256", 256, 256), LayerSpec("layer B 256x256", 256, 256))


def main() -> int:
  """Quantizes two outlier-laden layers with every preset and prints the error table."""
  start = time.perf_counter()
  print("svdq-jax demo: SVDQuant on two linear layers with channel-wise activation outliers and")
  print("weight outliers (svdq_jax.evaluation.outlier_layer); 256 calibration tokens, relative")
  print("output error on 256 held-out tokens against the float64 product.")
  results = error_table(DEMO_LAYERS, ALL_PRESETS, tokens=256)
  print(format_table(results))
  print(f"({time.perf_counter() - start:.0f} s; 'quant s' includes XLA compilation)")
  print("The rank-32 bf16 branch costs 2 * 32 * 16 / 256 = 4 bits per weight on these layers;")
  print("at FLUX.1's width 3072 it is 1/3 bit (benchmarks/quant_error.py: 4.50 bits in all).")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
