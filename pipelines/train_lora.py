"""Training a LoRA on a FLUX.1 pipeline's transformer, 4-bit (SVDQuant) or float.

The transformer stays frozen; each targeted linear gets a float32 LoRA branch
(`svdq_jax.lora.LoRAKernel`), and `jax.grad` reaches the LoRA factors through `svdq_dot`, whose
custom VJP gives a 4-bit layer's input its straight-through gradient from the layer's dequantized
residual, one layer at a time (`svdq_jax.dot`). The objective is FLUX's rectified flow
(`pipelines.flow_matching`) on the training images' VAE latents (posterior means) and the
captions' text features, both computed once before training (the encoders are frozen).

optax AdamW; the batch of step s and its noise come from (seed, s), so a run resumed from its
orbax checkpoint (LoRA factors, optimizer state, step, PRNG key) equals an uninterrupted one.

The run folder OUT receives:
  pytorch_lora_weights.safetensors   the LoRA as a diffusers/PEFT file (`convert.lora.write_lora`;
                                     `pipe(..., loras=[(file, s)])`, diffusers' load_lora_weights)
  loss.csv, loss.png                 the training loss per step and its curve
  train_lora.json                    the config, the final loss, and the memory the run needed:
                                     the process's peak resident memory, the device's peak (GPU),
                                     and XLA's account of the compiled step (arguments, temporaries)
  checkpoints/                       orbax checkpoints (the newest two)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from convert.lora import write_lora
from pipelines import plots
from pipelines.flow_matching import flow_matching_loss
from pipelines.flux import FluxPipeline, latent_image_ids, pack_latents
from pipelines.inputs import check_image_size
from pipelines.train_checkpoints import flat_leaves, restore_newest, save_step, unflat_leaves
from svdq_jax.errors import InputError
from svdq_jax.lora import adapter_of, init_lora_factors, linear_shapes, with_lora_branches
from svdq_jax.params import matches_any

LORA_FILE = "pytorch_lora_weights.safetensors"
RECORD_FILE = "train_lora.json"
DEFAULT_TARGETS: tuple[str, ...] = (
    "transformer_blocks/*/attn/*/kernel",
    "transformer_blocks/*/ff*/kernel",
    "single_transformer_blocks/*/attn/*/kernel",
    "single_transformer_blocks/*/proj_mlp/kernel",
    "single_transformer_blocks/*/proj_out/kernel",
)
"""Kernel paths a LoRA trains by default (fnmatch, `*` also matches "/"): every attention and
MLP linear of the blocks, as diffusers' FLUX DreamBooth LoRA script; not the AdaLN modulation,
the embedders or the final projection."""


@dataclasses.dataclass(frozen=True)
class LoRATrainConfig:
  """Hyperparameters of a LoRA training run.

  Attributes:
    rank: the LoRA's rank r.
    alpha: its alpha (scale alpha / r); None: r (scale 1).
    targets: fnmatch patterns of the kernel paths to train (`DEFAULT_TARGETS`).
    steps: optimizer steps.
    batch_size: examples per step (drawn at random per step, seeded).
    learning_rate, weight_decay: AdamW's (optax.adamw, its other defaults).
    seed: seed of the LoRA's initialisation, the batches, noise levels and noise.
    checkpoint_every: steps between checkpoints.
    guidance_scale: the guidance input of a FLUX.1-dev-like transformer (ignored without one).
    max_sequence_length: T5 tokens of the captions.
  """

  rank: int = 16
  alpha: float | None = None
  targets: tuple[str, ...] = DEFAULT_TARGETS
  steps: int = 1000
  batch_size: int = 1
  learning_rate: float = 1e-4
  weight_decay: float = 1e-4
  seed: int = 0
  checkpoint_every: int = 100
  guidance_scale: float = 3.5
  max_sequence_length: int = 512

  def __post_init__(self):
    for name in ("rank", "steps", "batch_size", "checkpoint_every", "max_sequence_length"):
      if int(getattr(self, name)) < 1:
        raise InputError(f"LoRATrainConfig: {name} must be >= 1, got {getattr(self, name)}")
    if not self.targets:
      raise InputError("LoRATrainConfig: targets is empty")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    """alpha / rank."""
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "targets": list(self.targets)}


@dataclasses.dataclass(frozen=True)
class EncodedData:
  """The training set as the transformer sees it.

  Attributes:
    latents: (N, S, 4C) float32, packed scaled VAE latents (posterior means) of the images.
    prompt_embeds: (N, T, D) T5 features of the captions.
    pooled: (N, P) CLIP pooled features.
    latent_hw: (h, w) of the unpacked latent grid.
  """

  latents: np.ndarray
  prompt_embeds: np.ndarray
  pooled: np.ndarray
  latent_hw: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class LoRATrainResult:
  """What `train_adapter` returns: the trained factors (`svdq_jax.lora.LoRAFactors`, numpy),
  the LoRA file, the loss per step, and the run's record (train_lora.json)."""

  factors: dict[str, dict[str, np.ndarray]]
  lora_file: Path
  losses: np.ndarray
  record: dict


def encode_examples(pipe: FluxPipeline, images: np.ndarray, captions: Sequence[str], *,
                    max_sequence_length: int = 512, batch: int = 16) -> EncodedData:
  """VAE latents of `images` (N, H, W, 3) uint8 and text features of `captions` (N of them).

  Raises:
    InputError: counts that differ, or an image size the pipeline cannot make.
  """
  if len(images) != len(captions) or len(images) == 0:
    raise InputError(f"encode_examples: {len(images)} images need as many captions, got "
                     f"{len(captions)} (and at least one)")
  n, height, width, _ = images.shape
  check_image_size("train_lora", height, width,
                   pipe.size_multiple(pipe.vae.config, pipe.transformer.config))
  graphdef, state = nnx.split(pipe.vae)
  encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x).mean)
  latents = []
  for i in range(0, n, batch):
    x = jnp.asarray((images[i:i + batch].astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))
    mean = pipe.vae.scale_latents(encode(state, x).astype(jnp.float32))
    latents.append(np.asarray(pack_latents(mean), np.float32))
  embeds, pooled = [], []
  for i in range(0, n, batch):
    e, p = pipe.encode_prompt(list(captions[i:i + batch]), max_sequence_length=max_sequence_length)
    embeds.append(np.asarray(e))
    pooled.append(np.asarray(p))
  return EncodedData(np.concatenate(latents), np.concatenate(embeds), np.concatenate(pooled),
                     pipe.latent_shape(height, width))


def target_shapes(transformer: nnx.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
  """`{kernel path: (K, N)}` of the transformer's linears that match `targets`.

  A FLUX transformer with `split_proj_out` (Nunchaku's layout) keeps its single blocks' output
  projections out: a diffusers LoRA file has one `proj_out` there, which is two layers here.

  Raises:
    InputError when nothing matches.
  """
  shapes = linear_shapes(nnx.state(transformer))
  split = bool(getattr(transformer.config, "split_proj_out", False))
  chosen = {path: shape for path, shape in shapes.items() if matches_any(path, tuple(targets))
            and not path.endswith("proj_out_mlp/kernel")
            and not (split and path.startswith("single_transformer_blocks/")
                     and path.endswith("/proj_out/kernel"))}
  if not chosen:
    raise InputError(f"train_lora: the target patterns {list(targets)} match no linear layer of "
                     f"the transformer (e.g. {sorted(shapes)[:3]})")
  return chosen


def _batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
  """The examples of step `step`: drawn from (seed, step), without repeats when n >= batch."""
  return np.random.default_rng([seed, step]).choice(n, batch, replace=n < batch)


def make_loss(transformer: nnx.Module, config: LoRATrainConfig, latent_hw: tuple[int, int]):
  """`loss(factors, base_state, x0 (B, S, C) float32, embeds (B, T, D), pooled (B, P), key)`:
  the rectified-flow loss of the transformer with the LoRA `factors` on its frozen parameters
  `base_state` (`nnx.state(transformer)`)."""
  graphdef, _ = nnx.split(transformer)
  guided = bool(transformer.config.guidance_embeds)
  img_ids = latent_image_ids(*latent_hw)

  def loss(factors, base_state, x0, embeds, pooled, key):
    model = nnx.merge(graphdef, with_lora_branches(base_state, factors, config.scale))
    txt_ids = jnp.zeros((embeds.shape[1], 3), jnp.float32)
    guidance = (jnp.full((x0.shape[0],), config.guidance_scale, jnp.float32) if guided
                else None)

    def velocity(x_t, t):
      v = model(hidden_states=x_t.astype(embeds.dtype), encoder_hidden_states=embeds,
                pooled_projections=pooled, timestep=t.astype(embeds.dtype), img_ids=img_ids,
                txt_ids=txt_ids, guidance=guidance)
      return v.astype(jnp.float32)

    return flow_matching_loss(velocity, x0, key)

  return loss


def make_step(transformer: nnx.Module, config: LoRATrainConfig, latent_hw: tuple[int, int]):
  """`step(factors, opt_state, base_state, x0, embeds, pooled, key) -> (factors, opt_state,
  loss)` (not jitted) and the optimizer (AdamW) whose state it takes."""
  loss_fn = make_loss(transformer, config, latent_hw)
  optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

  def step(factors, opt_state, base_state, x0, embeds, pooled, key):
    loss, grads = jax.value_and_grad(loss_fn)(factors, base_state, x0, embeds, pooled, key)
    updates, opt_state = optimizer.update(grads, opt_state, factors)
    return optax.apply_updates(factors, updates), opt_state, loss

  return step, optimizer


# ----------------------------------------------------------------------------------------------
# Checkpoints: {"factors", "opt_state"} flattened by leaf index (restored against a template, as
# the paths hold "/"), the step and the key's data.


def _tree(factors: Any, opt_state: Any, step: int, key: jax.Array) -> dict[str, Any]:
  """What a LoRA training checkpoint holds (`pipelines.train_checkpoints`)."""
  return {"factors": flat_leaves(factors), "opt_state": flat_leaves(opt_state),
          "step": np.asarray(step, np.int64), "key": jax.random.key_data(key)}


def _save(folder: Path, step: int, factors: Any, opt_state: Any, key: jax.Array) -> None:
  save_step(folder, step, _tree(factors, opt_state, step, key))


def _restore(folder: Path, factors: Any, opt_state: Any, key: jax.Array
             ) -> tuple[int, Any, Any, jax.Array] | None:
  """(step, factors, opt_state, key) of the newest checkpoint in `folder`, or None."""
  tree = restore_newest(folder, _tree(factors, opt_state, 0, key))
  if tree is None:
    return None
  return (int(tree["step"]), unflat_leaves(factors, tree["factors"]),
          unflat_leaves(opt_state, tree["opt_state"]), jax.random.wrap_key_data(tree["key"]))


# ----------------------------------------------------------------------------------------------
# Memory


def peak_rss_bytes() -> int:
  """The peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_peak_bytes() -> int | None:
  """The default device's peak allocated bytes, where the backend reports it (GPU), else None."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays of a pytree (an nnx.State included; ShapeDtypeStructs count)."""
  return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(tree)
                 if hasattr(leaf, "shape") and not jax.dtypes.issubdtype(leaf.dtype,
                                                                         jax.dtypes.prng_key)))


def _step_memory(compiled: Any) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {"argument_bytes": int(analysis.argument_size_in_bytes),
          "temp_bytes": int(analysis.temp_size_in_bytes),
          "output_bytes": int(analysis.output_size_in_bytes),
          "alias_bytes": int(analysis.alias_size_in_bytes)}


# ----------------------------------------------------------------------------------------------
# The run


def _check_config(out: Path, config: LoRATrainConfig) -> None:
  """Writes OUT/lora_train_config.json, or checks that a resumed run has the same config (its
  step count and checkpoint interval may change)."""
  file = out / "lora_train_config.json"
  current = config.to_dict()
  if file.exists():
    saved = json.loads(file.read_text())
    differ = sorted(k for k in current if k not in ("steps", "checkpoint_every")
                    and saved.get(k) != current[k])
    if differ and (out / "checkpoints").exists():
      raise InputError(f"{out}: holds a LoRA run with another config ({', '.join(differ)} "
                       "differ); resume it with the same settings or use a new folder")
  file.write_text(json.dumps(current, indent=2) + "\n")


def _read_losses(file: Path, upto: int) -> list[tuple[int, float]]:
  if not file.exists():
    return []
  rows = [line.split(",") for line in file.read_text().splitlines() if line]
  return [(int(s), float(v)) for s, v in rows if int(s) < upto]


def train_adapter(transformer: nnx.Module, data: EncodedData, out: str | os.PathLike,
                  config: LoRATrainConfig = LoRATrainConfig(), *, model_type: str = "flux",
                  progress: bool = True) -> LoRATrainResult:
  """Trains (or resumes) a LoRA on a frozen FLUX transformer; see the module docstring.

  Args:
    transformer: a `FluxTransformer`, 4-bit or float; it is not modified.
    data: the encoded training set (`encode_examples`).
    out: the run folder (created; an existing run in it is resumed).
    config: the hyperparameters.
    model_type: the key names of the written LoRA file ("flux").
    progress: a tqdm bar over the steps.

  Returns:
    The trained factors, the LoRA file, the losses and the record written to train_lora.json.

  Raises:
    InputError: targets matching no layer, or `out` holding a run with another config.
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  _check_config(out, config)
  started = time.time()
  shapes = target_shapes(transformer, config.targets)
  base_state = nnx.state(transformer)
  key = jax.random.key(config.seed)
  factors = init_lora_factors(shapes, config.rank, jax.random.fold_in(key, 1))
  step_fn, optimizer = make_step(transformer, config, data.latent_hw)
  opt_state = optimizer.init(factors)
  step = 0
  restored = _restore(out / "checkpoints", factors, opt_state, key)
  if restored is not None:
    step, factors, opt_state, key = restored
  n = len(data.latents)
  dtype = data.prompt_embeds.dtype  # the text encoders' dtype, the transformer's input dtype

  def batch(s: int) -> tuple:
    idx = _batch_indices(config.seed, s, n, config.batch_size)
    return (jnp.asarray(data.latents[idx]), jnp.asarray(data.prompt_embeds[idx], dtype),
            jnp.asarray(data.pooled[idx], dtype), jax.random.fold_in(key, 1000 + s))

  compiled = jax.jit(step_fn, donate_argnums=(0, 1)).lower(
      factors, opt_state, base_state, *batch(0)).compile()
  loss_file = out / "loss.csv"
  losses = _read_losses(loss_file, step)
  loss_file.write_text("".join(f"{s},{v!r}\n" for s, v in losses))
  pending: list[tuple[int, jax.Array]] = []

  def flush() -> None:
    with loss_file.open("a") as f:
      f.writelines(f"{s},{float(v)!r}\n" for s, v in pending)
    losses.extend((s, float(v)) for s, v in pending)
    pending.clear()

  with tqdm(total=config.steps, initial=step, desc="train-lora", unit="step",
            disable=not progress) as bar:
    while step < config.steps:
      factors, opt_state, loss = compiled(factors, opt_state, base_state, *batch(step))
      pending.append((step, loss))
      step += 1
      bar.update(1)
      if step % config.checkpoint_every == 0 or step == config.steps:
        flush()
        bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
        _save(out / "checkpoints", step, factors, opt_state, key)
  flush()

  factors = jax.tree.map(np.asarray, factors)
  lora_file = write_lora(out / LORA_FILE, adapter_of(factors, config.scale), model_type)
  curve = np.array(losses, np.float64).reshape(-1, 2)
  plots.line_plot(curve, title="LoRA training loss (log scale) against step").save(
      out / "loss.png")
  record = {
      "config": config.to_dict(),
      "steps": step,
      "examples": n,
      "layers": len(shapes),
      "lora_parameters": int(sum(v.size for layer in factors.values() for v in layer.values())),
      "final_loss": float(curve[-min(len(curve), 20):, 1].mean()) if len(curve) else None,
      "base_parameter_bytes": tree_bytes(base_state),
      "step_memory": _step_memory(compiled),
      "peak_rss_bytes": peak_rss_bytes(),
      "device_peak_bytes": device_peak_bytes(),
      "seconds": round(time.time() - started, 1),
      "backend": jax.default_backend(),
  }
  (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return LoRATrainResult(factors, lora_file, curve[:, 1], record)


def train_lora(pipe: FluxPipeline, images: np.ndarray, captions: Sequence[str],
               out: str | os.PathLike, config: LoRATrainConfig = LoRATrainConfig(), *,
               progress: bool = True) -> LoRATrainResult:
  """Encodes the images (N, H, W, 3) uint8 and captions with the pipeline's VAE and text
  encoders, then trains a LoRA on its transformer (`train_adapter`)."""
  if not isinstance(pipe, FluxPipeline):
    raise InputError(f"train_lora: LoRA training supports FluxPipeline models, got "
                     f"{type(pipe).__name__}")
  data = encode_examples(pipe, images, captions, max_sequence_length=config.max_sequence_length)
  return train_adapter(pipe.transformer, data, out, config, progress=progress)
