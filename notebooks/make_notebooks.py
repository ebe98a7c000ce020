"""Writes notebooks/quickstart.ipynb (cells without outputs); CI executes it (tests/notebooks).

Run `python notebooks/make_notebooks.py` after editing the cells below.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# svdq-jax quickstart

SVDQuant on one linear layer, then on a whole (tiny, random-init) FLUX transformer, on CPU.
Everything here runs in a minute or two on two cores; the same calls work on real checkpoints
(`FluxTransformer.from_pretrained(folder)`)."""),
    ("code", """import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdq_jax import QuantConfig, calibrate, quantize_linear, quantize_model, svdq_dot
from svdq_jax.evaluation import outlier_layer
from svdq_jax.metrics import bits_per_weight, relative_error

print(jax.__version__, jax.devices())"""),
    ("md", """## One layer with diffusion-like outliers

`outlier_layer` plants channel-wise activation outliers and heavy weight rows (its docstring gives
the recipe). The first 256 activation rows calibrate, the rest measure the output error against
the float64 product."""),
    ("code", """kernel, activations = outlier_layer(0, 512, 512, tokens=256)
calib, held_out = jnp.asarray(activations[:256]), jnp.asarray(activations[256:])
reference = activations[256:].astype(np.float64) @ kernel.astype(np.float64)

for preset in ("w4a4", "smoothquant-w4a4", "svdquant-int4"):
    start = time.perf_counter()
    layer = quantize_linear(jnp.asarray(kernel), None, calib, QuantConfig.preset(preset))
    seconds = time.perf_counter() - start
    error = relative_error(svdq_dot(held_out, layer, impl="xla"), reference)
    print(f"{preset:18s} error {error:.4f}  bits/weight {bits_per_weight(layer):.2f}  "
          f"({seconds:.1f} s)")"""),
    ("md", """The quantized layer is a pytree: it goes through `jax.jit` as it is, and
`dequantize()` gives back its effective (K, N) kernel (4-bit residual plus low-rank branch)."""),
    ("code", """layer = quantize_linear(jnp.asarray(kernel), None, calib,
                        QuantConfig.preset("svdquant-int4"))
print(jax.tree_util.tree_map(lambda leaf: (leaf.shape, str(leaf.dtype)), layer))
fast = jax.jit(lambda x, w: svdq_dot(x, w))
print("jit == eager:", bool(jnp.array_equal(fast(held_out, layer), svdq_dot(held_out, layer))))
print("weight error of the effective kernel:", relative_error(layer.dequantize(), kernel))"""),
    ("md", """## A whole model in three calls

A tiny FLUX transformer (random weights, FLUX.1's structure). `calibrate` records every linear
layer's inputs while the model runs; `quantize_model` replaces the selected kernels by
`SVDQLinear`s (block linears W4A4, AdaLN modulation linears W4A16, embedders and the final
projection kept 16-bit, as Nunchaku ships FLUX)."""),
    ("code", """from models.flux import FluxConfig, FluxTransformer

config = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                    guidance_embeds=True, axes_dims_rope=(8, 12, 12))
model = FluxTransformer(config, rngs=nnx.Rngs(0))

def inputs(seed):
    rng = np.random.default_rng(seed)
    height, width = 8, 8
    ids = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
    img_ids = np.concatenate([np.zeros((height * width, 1)), ids.reshape(-1, 2)], 1)
    return dict(
        hidden_states=jnp.asarray(rng.normal(size=(1, height * width, 16)), jnp.float32),
        encoder_hidden_states=jnp.asarray(rng.normal(size=(1, 16, 64)), jnp.float32),
        pooled_projections=jnp.asarray(rng.normal(size=(1, 32)), jnp.float32),
        timestep=jnp.asarray([rng.uniform()], jnp.float32),
        img_ids=jnp.asarray(img_ids, jnp.float32), txt_ids=jnp.zeros((16, 3), jnp.float32),
        guidance=jnp.asarray([3.5], jnp.float32))

float_output = model(**inputs(100))
stats = calibrate(lambda kw: model(**kw), [inputs(seed) for seed in range(4)], model=model)
quantize_model(model, stats, QuantConfig.preset("svdquant-int4", smooth=(0.5,), svd_iters=2,
                                                rank=16))
quantized_output = nnx.jit(lambda m, kw: m(**kw))(model, inputs(100))
print("relative error of the quantized model:", relative_error(quantized_output, float_output))"""),
    ("code", """from svdq_jax import is_quantized

state = nnx.state(model, nnx.Param)
kinds = {}
for path, variable in nnx.to_flat_state(state):
    if path[-1] == "kernel":
        value = variable.get_value()
        kind = (value.act_format and "W4A4" or "W4A16") if is_quantized(value) else "16-bit"
        kinds.setdefault(kind, []).append("/".join(map(str, path[:-1])))
for kind, layers in kinds.items():
    print(f"{kind:7s} {len(layers):2d} layers, e.g. {layers[0]}")"""),
]


def build() -> nbformat.NotebookNode:
  """The quickstart notebook, cells only."""
  cells = [new_markdown_cell(text) if kind == "md" else new_code_cell(text)
           for kind, text in CELLS]
  notebook = new_notebook(cells=cells)
  notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
  return notebook


if __name__ == "__main__":
  path = Path(__file__).with_name("quickstart.ipynb")
  nbformat.write(build(), path)
  print(f"wrote {path}")
