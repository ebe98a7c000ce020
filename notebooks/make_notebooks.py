"""Writes the notebooks (cells without outputs); CI executes them (tests/notebooks).

  quickstart.ipynb   SVDQuant on one layer and on a tiny FLUX transformer
  lora.ipynb         training a LoRA on a tiny 4-bit FLUX transformer, then applying it
  inside_svdquant.ipynb  smoothing, singular values, error against rank and smoothing strength,
                         on two linears of the shipped demo model and its activations
  end_to_end.ipynb   the demo model converted, quantized (svdquant-int4), sampled beside the
                     float model: PSNR per image, transformer bytes

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

INSIDE_SVDQUANT = [
    ("md", """# Inside SVDQuant, on the demo model's own layers

SVDQuant quantizes a linear layer y = x W in three moves (DESIGN.md, section 1): smoothing
divides each input channel of x by λ and multiplies the matching row of W by it (activation
outliers move into the weights), a rank-r 16-bit branch takes the largest singular directions of
the smoothed weight, and only the residual is quantized to 4 bits. Here each move is looked at on
two linears of the shipped demo model (`demo/emoji_flux`, a small FLUX.1-architecture pipeline
trained on emoji): the first double block's attention query projection and its MLP
down-projection, with the activations they see while the model samples. Every plot is drawn when
the notebook runs; the calls are `svdq_jax`'s own (`quantize_linear`, `smooth_candidates`,
`svdq_dot`, `metrics`)."""),
    ("code", """import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from demo import sampling
from pipelines import calibrate_denoiser
from svdq_jax import QuantConfig, quantize_linear, svdq_dot
from svdq_jax.config import DEFAULT_SMOOTH_GRID
from svdq_jax.metrics import relative_error
from svdq_jax.transform import smooth_candidates

pipe = sampling.load_pipeline("demo/emoji_flux")
# The folder's sampling settings (32x32, 12 tokens, true CFG 4 against ""), two steps per run.
settings = {k: v for k, v in sampling.SAMPLE_DEFAULTS.items() if k != "num_inference_steps"}
CALIBRATION = ["cyclone", "hot dog", "tulip"]  # training names, none an evaluation prompt
HELD_OUT = ["red apple", "rocket", "owl"]  # measures the errors on activations not calibrated on
stats = calibrate_denoiser(pipe, CALIBRATION, num_inference_steps=2, batch_size=3,
                           progress=False, **settings)
test_stats = calibrate_denoiser(pipe, HELD_OUT, num_inference_steps=2, batch_size=3, seed=1,
                                progress=False, **settings)
kernels = {"/".join(map(str, path)): np.asarray(v.get_value(), np.float32)
           for path, v in nnx.to_flat_state(nnx.state(pipe.transformer, nnx.Param))}
LAYERS = {"to_q": "transformer_blocks/0/attn/to_q/kernel",
          "ff down": "transformer_blocks/0/ff/net/2/kernel"}
for label, path in LAYERS.items():
  print(f"{label:8s} {path}: kernel {kernels[path].shape}, {stats[path].num_tokens} calibration "
        f"tokens ({stats[path].samples.shape[0]} kept), {test_stats[path].samples.shape[0]} "
        "held-out")"""),
    ("md", """## The quantized layers

`quantize_linear` gets what `quantize_params` gives it for the whole model: the kernel, the
calibration samples and the per-channel spans. The defaults of the `svdquant-int4` preset search
the smoothing factor λ over DeepCompressor's grid (α = 0.1 ... 0.9, an activation-only form
span_x^α and the SmoothQuant form span_x^α / span_w^(1−α), and no smoothing), keep a rank-32
branch and quantize the residual to INT4 in groups of 64. The MLP down-projection reads GELU
outputs, so its activations are shifted by 0.171875 and quantized as unsigned INT4.
`smooth_candidates` rebuilds the search's candidates, which tells which one won."""),
    ("code", """def quantize(path, config, **overrides):
  s = stats[path]
  return quantize_linear(kernels[path], None, s.samples, config, act_absmax=s.absmax,
                         act_max=s.maximum, act_min=float(s.minimum.min()), **overrides)


def held_out_error(path, layer, scale=None):
  \"\"\"Relative output error on held-out activations (x / scale: a pre-smoothed layer).\"\"\"
  x = test_stats[path].samples
  reference = x.astype(np.float64) @ kernels[path]
  inputs = x if scale is None else x / scale
  return relative_error(svdq_dot(jnp.asarray(inputs), layer, impl="xla"), reference)


layers, smooths, spans = {}, {}, {}
for label, path in LAYERS.items():
  layer = quantize(path, QuantConfig.preset("svdquant-int4"))
  layers[label], smooths[label] = layer, np.asarray(layer.smooth)
  # The span of what the 4-bit path quantizes: max |x| per channel, or max |x + shift|.
  s = stats[path]
  span_x = s.maximum + layer.act_shift if layer.act_shift else s.absmax
  span_w = np.abs(kernels[path]).max(axis=1)
  spans[label] = (span_x, span_w)
  candidates = np.asarray(smooth_candidates(jnp.asarray(span_x), jnp.asarray(span_w),
                                            DEFAULT_SMOOTH_GRID))
  won = int(np.argmin(np.abs(candidates - smooths[label]).max(axis=1)))
  alphas = len(DEFAULT_SMOOTH_GRID)
  form = ("no smoothing" if won == 0 else
          f"span_x^{DEFAULT_SMOOTH_GRID[won - 1]}" if won <= alphas else
          f"span_x^{DEFAULT_SMOOTH_GRID[won - 1 - alphas]} / span_w^"
          f"{1 - DEFAULT_SMOOTH_GRID[won - 1 - alphas]:.1f}")
  print(f"{label:8s} act_shift {layer.act_shift}, chosen smoothing: {form}; "
        f"held-out error {held_out_error(path, layer):.4f}")"""),
    ("md", """## Per-channel magnitudes before and after smoothing

Left: the largest |x| each input channel saw (|x + 0.171875| for the shifted MLP
down-projection: the activation span), before and after dividing by λ. Right: the largest |W|
in each input channel's row, before and after multiplying by λ. A few activation channels
dominate before; after smoothing the activations are flatter (a 4-bit scale per token fits them
better) and the weight rows carry the difference."""),
    ("code", """fig, axes = plt.subplots(len(LAYERS), 2, figsize=(11, 6.5), squeeze=False)
for row, label in enumerate(LAYERS):
  span_x, span_w = spans[label]
  smooth = smooths[label]
  panels = [("activation |x| max", span_x, span_x / smooth),
            ("weight row |W| max", span_w, span_w * smooth)]
  for ax, (what, before, after) in zip(axes[row], panels, strict=True):
    ax.plot(before, lw=0.8, label="before")
    ax.plot(after, lw=0.8, label="after smoothing")
    ax.set_yscale("log")
    ax.set_title(f"{label}: {what} per input channel")
    ax.set_xlabel("input channel")
    ax.legend()
  ratio = lambda v: float(v.max() / np.median(v))
  print(f"{label:8s} activation max/median channel ratio {ratio(span_x):.2f} -> "
        f"{ratio(span_x / smooth):.2f}; weight {ratio(span_w):.2f} -> {ratio(span_w * smooth):.2f}")
fig.tight_layout()
plt.show()"""),
    ("md", """## Singular values: the weight, the smoothed weight, the residual

The rank-32 branch takes the largest singular directions of the smoothed weight λW. What the
4-bit residual λW − L1 L2 keeps is the tail of the spectrum: its largest singular value is about
the 33rd of λW (Eckart–Young; the branch is refined against the quantization error, so not
exactly)."""),
    ("code", """fig, axes = plt.subplots(1, len(LAYERS), figsize=(11, 3.5), squeeze=False)
for ax, label in zip(axes[0], LAYERS, strict=True):
  layer, smooth, kernel = layers[label], smooths[label], kernels[LAYERS[label]]
  smoothed = smooth[:, None] * kernel
  branch = (smooth[:, None] * np.asarray(layer.lora_down, np.float32)) @ np.asarray(
      layer.lora_up, np.float32)
  spectra = {"W": np.linalg.svd(kernel, compute_uv=False),
             "λW (smoothed)": np.linalg.svd(smoothed, compute_uv=False),
             "λW − L1 L2 (residual)": np.linalg.svd(smoothed - branch, compute_uv=False)}
  for name, values in spectra.items():
    ax.semilogy(values, label=name)
  ax.axvline(layer.rank, color="gray", ls=":", lw=0.8)
  ax.set_title(f"{label}: singular values")
  ax.set_xlabel("index")
  ax.legend()
  top = lambda s: float(np.sum(s[:32] ** 2) / np.sum(s ** 2))
  print(f"{label:8s} energy in the top 32 singular values: W {top(spectra['W']):.3f}, smoothed "
        f"{top(spectra['λW (smoothed)']):.3f}; residual's largest singular value / smoothed "
        f"weight's 33rd: {spectra['λW − L1 L2 (residual)'][0] / spectra['λW (smoothed)'][32]:.3f}")
fig.tight_layout()
plt.show()"""),
    ("md", """## Layer error against the rank of the branch

The same quantization (smoothing searched again at each rank) with a branch of rank 0 (SmoothQuant
W4A4, as the `smoothquant-w4a4` preset), 4, 8, 16 and 32, measured on held-out activations."""),
    ("code", """RANKS = (0, 4, 8, 16, 32)
rank_errors = {label: [held_out_error(path, quantize(path, QuantConfig.preset(
                   "svdquant-int4", rank=rank))) for rank in RANKS]
               for label, path in LAYERS.items()}
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for label, errors in rank_errors.items():
  ax.plot(RANKS, errors, "o-", label=label)
  print(f"{label:8s} error by rank: "
        + ", ".join(f"{r}: {e:.4f}" for r, e in zip(RANKS, errors, strict=True)))
ax.set_xlabel("rank of the 16-bit branch")
ax.set_ylabel("relative output error")
ax.set_yscale("log")
ax.legend()
plt.show()"""),
    ("md", """## Layer error against the smoothing strength α

To see what each strength does by itself, λ is fixed instead of searched: λ = span_x^α (α = 0 is
no smoothing) and the SmoothQuant form λ = span_x^α / span_w^(1−α). The layer is quantized in the
smoothed domain (kernel λW, inputs x / λ, `smooth=None`, rank 32), which is the same layer;
activations are signed INT4 here for both layers, so the points compare with each other (the
searched layer of the MLP down-projection above uses the shifted unsigned INT4). The searched λ
goes through the same path as a dashed line."""),
    ("code", """ALPHAS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
fixed = QuantConfig.preset("svdquant-int4", smooth=None)


def presmoothed_error(path, smooth):
  layer = quantize_linear(kernels[path] * smooth[:, None], None, stats[path].samples / smooth,
                          fixed, act_shift=0.0)
  return held_out_error(path, layer, scale=smooth)


fig, axes = plt.subplots(1, len(LAYERS), figsize=(11, 3.5), squeeze=False)
for ax, (label, path) in zip(axes[0], LAYERS.items(), strict=True):
  span_x, span_w = jnp.asarray(stats[path].absmax), jnp.asarray(spans[label][1])
  curves = {"span_x^α": [], "span_x^α / span_w^(1−α)": []}
  for alpha in ALPHAS:
    candidates = np.asarray(smooth_candidates(span_x, span_w, (alpha,)))
    curves["span_x^α"].append(presmoothed_error(path, candidates[1]))
    curves["span_x^α / span_w^(1−α)"].append(presmoothed_error(path, candidates[2]))
  searched = presmoothed_error(path, smooths[label])
  for name, errors in curves.items():
    ax.plot(ALPHAS, errors, "o-", label=name)
  ax.axhline(searched, color="gray", ls="--", label="searched λ")
  ax.set_title(f"{label}: error against α (rank 32)")
  ax.set_xlabel("α")
  ax.set_yscale("log")
  ax.legend()
  best = int(np.argmin(curves["span_x^α"]))
  print(f"{label:8s} error at alpha 0 (no smoothing) {curves['span_x^α'][0]:.4f}, "
        f"best span_x^alpha at alpha {ALPHAS[best]} {curves['span_x^α'][best]:.4f}, "
        f"searched smoothing {searched:.4f}")
fig.tight_layout()
plt.show()"""),
]


END_TO_END = [
    ("md", """# Text to image, end to end

The shipped demo model (`demo/emoji_flux`: a FLUX.1-architecture pipeline trained here on
OpenMoji emoji, diffusers layout) goes the way a real FLUX.1 folder goes: converted to this
project's checkpoint format (`svdq-jax convert`), calibrated on a few prompts and quantized with
the `svdquant-int4` preset (`svdq-jax quantize`), then sampled with the same prompts and seeds as
the float model (`svdq-jax sample`). The Python calls below are the ones those commands make."""),
    ("code", """import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from flax import nnx

import convert
from demo import sampling
from pipelines import PipelineFolder, load_pipeline, quantize_pipeline
from svdq_jax import metrics

work = Path(tempfile.mkdtemp())
start = time.perf_counter()
ours = convert.convert("demo/emoji_flux", work / "emoji_flux", progress=False)
print(f"converted in {time.perf_counter() - start:.1f} s:", sorted(p.name for p in ours.iterdir()))
print("sampling defaults of the folder:", PipelineFolder.read(ours).sample_defaults)"""),
    ("md", """## Quantize

`quantize_pipeline` samples the calibration prompts eagerly for two steps (with the folder's
settings: 32x32, true classifier-free guidance, so both branches are recorded), quantizes the
transformer (block linears W4A4 with a rank-32 branch, AdaLN modulation W4A16, embedders and the
final projection 16-bit) and writes a pipeline folder whose other components are copied."""),
    ("code", """CALIBRATION = ["cyclone", "hot dog", "tulip", "mushroom"]  # training names
start = time.perf_counter()
quantized = quantize_pipeline(ours, work / "emoji_flux_int4", preset="svdquant-int4",
                              prompts=CALIBRATION, num_inference_steps=2, progress=False)
print(f"quantized in {time.perf_counter() - start:.1f} s:",
      (quantized / "svdq_quantization.json").read_text()[:120], "...")"""),
    ("md", """## Sample, float and 4-bit, same prompts and seeds

`demo.sampling.generate` uses the folder's settings (20 steps, guidance 4 against the empty
prompt). The float model with another seed gives the PSNR of two unrelated images of the same
prompt: the 4-bit model's images should be far closer to the float ones than that."""),
    ("code", """PROMPTS = ["red apple", "rocket", "penguin", "sunflower"]
float_pipe = load_pipeline(ours)
int4_pipe = load_pipeline(quantized)
float_images = sampling.generate(float_pipe, PROMPTS, seed=0)
int4_images = sampling.generate(int4_pipe, PROMPTS, seed=0)
other_seed = sampling.generate(float_pipe, PROMPTS, seed=1)

fig, axes = plt.subplots(2, len(PROMPTS), figsize=(2.2 * len(PROMPTS), 4.8))
for column, prompt in enumerate(PROMPTS):
  for row, (name, images) in enumerate([("float", float_images), ("svdquant-int4", int4_images)]):
    axes[row, column].imshow(images[column], interpolation="nearest")
    axes[row, column].set_title(f"{name}\\n{prompt}", fontsize=8)
    axes[row, column].axis("off")
fig.tight_layout()
plt.show()
for prompt, a, b, c in zip(PROMPTS, int4_images, float_images, other_seed, strict=True):
  print(f"{prompt:10s} PSNR int4 vs float {metrics.psnr(a, b):.2f} dB  "
        f"(float, other seed: {metrics.psnr(c, b):.2f} dB)")"""),
    ("md", """## Size of the transformer

`metrics.model_bytes` counts what the parameters take as stored: the float model as loaded
(its parameters' dtypes are printed) and in bf16 (as shipped), and the 4-bit one (packed INT4
codes, scales, the smoothing factors, the bf16 rank-32 branch, and the layers kept in 16 bits).
At this toy width (128) the rank-32 branch is as large as half a bf16 kernel, so the 4-bit
transformer is far less than 4x smaller than bf16; at FLUX.1's width (3072) the same rules give
3.56x (the README's memory table of the FLUX.1-dev transformer, `benchmarks/memory.py`)."""),
    ("code", """float_state = nnx.state(float_pipe.transformer, nnx.Param)
dtypes = ", ".join(sorted({str(leaf.dtype) for leaf in jax.tree.leaves(float_state)}))
float_bytes = metrics.model_bytes(float_state)
bf16_bytes = metrics.model_bytes(
    [jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16) for leaf in jax.tree.leaves(float_state)])
int4_bytes = metrics.model_bytes(nnx.state(int4_pipe.transformer, nnx.Param))
print(f"transformer bytes: float as loaded ({dtypes}) {float_bytes}, bf16 {bf16_bytes}, "
      f"svdquant-int4 {int4_bytes}")
print(f"size ratio bf16 / int4: {bf16_bytes / int4_bytes:.2f}")"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "lora.ipynb": LORA,
             "inside_svdquant.ipynb": INSIDE_SVDQUANT, "end_to_end.ipynb": END_TO_END}


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
