"""Writes the notebooks (cells without outputs); CI executes them (tests/notebooks).

  quickstart.ipynb   SVDQuant on one layer and on a tiny FLUX transformer
  lora.ipynb         training a LoRA on a tiny 4-bit FLUX transformer, then applying it

Run `python notebooks/make_notebooks.py` after editing the cells below.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

QUICKSTART = [
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


LORA = [
    ("md", """# Training a LoRA on a 4-bit model, then applying it

A tiny FLUX transformer (random weights) is quantized to 4 bits (SVDQuant INT4: W4A4 block
linears with a rank-8 low-rank branch); a rank-4 LoRA is trained on top of it with FLUX's
rectified-flow loss while the 4-bit weights stay frozen (the gradient reaches the LoRA through
`svdq_dot`'s custom VJP), saved as a diffusers/PEFT file, and applied with strengths. The data are
random latents and text features: the point is the mechanics, in seconds on a CPU. On a real
pipeline the same is `svdq-jax train-lora MODEL DATA OUT` and `svdq-jax sample --lora FILE`."""),
    ("code", """import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.lora import load_loras
from models.flux import FluxConfig, FluxTransformer
from pipelines.train_lora import EncodedData, LoRATrainConfig, make_loss, train_adapter
from svdq_jax import QuantConfig, apply_loras, quantize_model

config = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                    guidance_embeds=False, axes_dims_rope=(8, 12, 12))
model = FluxTransformer(config, rngs=nnx.Rngs(0))
quantize_model(model, None, QuantConfig.preset(smooth=None, svd_iters=1, rank=8), progress=False)
to_q = model.transformer_blocks[0].attn.to_q.kernel.get_value()
print(type(to_q).__name__, to_q.weight_format, to_q.act_format, "rank", to_q.rank)"""),
    ("md", """## Training

Four "images" (packed latents of a 4x4 latent grid) with their text features. `train_adapter`
trains the LoRA with AdamW, checkpoints it (orbax: factors, optimizer state, step, key; an
interrupted run resumes exactly) and writes the LoRA file, the loss curve and the memory it
needed into the run folder."""),
    ("code", """rng = np.random.default_rng(0)
data = EncodedData(latents=rng.standard_normal((4, 4, 16)).astype(np.float32),
                   prompt_embeds=rng.standard_normal((4, 8, 64)).astype(np.float32),
                   pooled=rng.standard_normal((4, 32)).astype(np.float32), latent_hw=(4, 4))
train_config = LoRATrainConfig(rank=4, steps=40, batch_size=4, learning_rate=2e-2,
                               checkpoint_every=20, max_sequence_length=8)
run = Path(tempfile.mkdtemp()) / "lora_run"
result = train_adapter(model, data, run, train_config, progress=False)
print(sorted(p.name for p in run.iterdir()))
print("trained layers:", result.record["layers"], " LoRA parameters:",
      result.record["lora_parameters"])
print("training step (XLA):", result.record["step_memory"])"""),
    ("code", """loss = jax.jit(make_loss(model, train_config, data.latent_hw))
state = nnx.state(model)

def mean_loss(factors):  # over the data set and 16 fixed noise draws
    return float(np.mean([loss(factors, state, jnp.asarray(data.latents),
                               jnp.asarray(data.prompt_embeds), jnp.asarray(data.pooled),
                               jax.random.key(100 + i)) for i in range(16)]))

before = mean_loss(jax.tree.map(np.zeros_like, result.factors))
after = mean_loss(result.factors)
print(f"loss without the LoRA {before:.4f}, with it {after:.4f}")
print(f"LoRA loss ratio: {after / before:.3f}")"""),
    ("md", """## Applying the saved LoRA

The file is a diffusers/PEFT LoRA (`transformer.<module>.lora_A/lora_B`). `apply_loras`
concatenates it onto each 4-bit layer's low-rank branch (the 4-bit residual is untouched); the
strength is an array, so a jitted forward is not recompiled when it changes (the wider branch
compiles once). Strength 0 leaves the output unchanged up to float rounding (the branch's
product has more terms); using the base parameters again gives the base model bit for bit."""),
    ("code", """graphdef, state = nnx.split(model)
forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(
    hidden_states=x, encoder_hidden_states=jnp.asarray(data.prompt_embeds[:1]),
    pooled_projections=jnp.asarray(data.pooled[:1]), timestep=jnp.asarray([0.5]),
    img_ids=jnp.zeros((4, 3)), txt_ids=jnp.zeros((8, 3))))
x = jnp.asarray(data.latents[:1])
base = np.asarray(forward(state, x))
adapters, _ = load_loras("flux", [(result.lora_file, 1.0)], state)
outputs = {s: np.asarray(forward(apply_loras(state, adapters, [s]), x)) for s in (0.0, 0.5, 1.0)}
merged_q = apply_loras(state, adapters, [1.0])["transformer_blocks"][0]["attn"]["to_q"]["kernel"]
print("to_q branch rank with the LoRA:", merged_q.get_value().rank)
print("strength 0, largest change:", float(np.abs(outputs[0.0] - base).max()))
print("change at 0.5 / change at 1.0:",
      round(float(np.abs(outputs[0.5] - base).mean() / np.abs(outputs[1.0] - base).mean()), 3))
print("without the LoRA again == base:", np.array_equal(np.asarray(forward(state, x)), base))
print("compiled forwards:", forward._cache_size())"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "lora.ipynb": LORA}


def build(cells: list[tuple[str, str]] = QUICKSTART) -> nbformat.NotebookNode:
  """A notebook of `cells` ("md" or "code", text), cells only."""
  cells = [new_markdown_cell(text) if kind == "md" else new_code_cell(text)
           for kind, text in cells]
  notebook = new_notebook(cells=cells)
  notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
  return notebook


if __name__ == "__main__":
  for name, cells in NOTEBOOKS.items():
    path = Path(__file__).with_name(name)
    nbformat.write(build(cells), path)
    print(f"wrote {path}")
