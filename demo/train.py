"""Trains the demo model from scratch: `python -m demo.train --out DIR [--stop-at HH:MM]`.

Stages, each resumable from its orbax checkpoints under DIR/checkpoints (parameters, optimizer
state, EMA, step and the base PRNG key), so an interrupted run continues where it stopped:

  1. data: the training split of `demo.data` rendered at 32x32; tokenizers learned from its names
     (DIR/tokenizer, DIR/tokenizer_2);
  2. vae: the AutoencoderKL, AdamW on L1 + L2 reconstruction from the noised posterior mean;
  3. latents: each training image's posterior mean and the latent shift and scale that make the
     scaled latents zero-mean and unit-variance;
  4. denoiser: the FLUX transformer and both text encoders jointly, AdamW with warmup and cosine
     decay, FLUX's rectified-flow loss on the cached latents, EMA weights;
  5. export: DIR/pipeline, a FluxPipeline folder in our checkpoint format (EMA weights), with the
     loss curve (loss.png), the model card (MODEL_CARD.md) and a sample grid (samples.png).

Determinism: for a seed, the batches (a seeded permutation per epoch), the noise and the noise
levels (keys folded from the step number) are fixed, so a resumed run equals an uninterrupted one.
`--stop-at` ends the denoiser stage early at a checkpoint (a wall-clock deadline, UTC) and exports
what it has; the card says how many steps were done.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image
from tqdm.auto import tqdm

from convert.checkpoint import atomic_folder, save_checkpoint
from demo import architecture, data, objectives, sampling
from demo import tokenizer as demo_tokenizer
from demo.flags import add_config_flags, config_from_flags
from models.tokenizers import Tokenizer
from pipelines import plots
from pipelines.folder import SAMPLE_DEFAULTS_FILE
from pipelines.train_checkpoints import flat_leaves, restore_newest, save_step, unflat_leaves

PIPELINE_DIR = "pipeline"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of a demo training run (the defaults are the shipped model's)."""

  seed: int = 0
  vae_steps: int = 1500
  vae_batch: int = 32
  vae_lr: float = 2e-3
  vae_latent_weight: float = 1e-3
  steps: int = 5000
  guidance_steps: int = 6000  # second phase: prompts dropped at guidance_dropout, for true CFG
  guidance_dropout: float = 0.1
  batch: int = 32
  lr: float = 1e-3
  warmup: int = 100
  weight_decay: float = 0.01
  ema_decay: float = 0.999
  checkpoint_every: int = 100
  vocab_size: int = architecture.VOCAB_SIZE
  width: int = 128
  double_blocks: int = 2
  single_blocks: int = 2
  text_width: int = architecture.TEXT_WIDTH
  text_layers: int = 2
  vae_channels: tuple[int, ...] = (16, 32, 64)
  limit_images: int | None = None  # first N training emoji only (tests)

  def configs(self) -> architecture.DemoConfigs:
    return architecture.demo_configs(
        width=self.width, double_blocks=self.double_blocks, single_blocks=self.single_blocks,
        text_width=self.text_width, text_layers=self.text_layers, vocab_size=self.vocab_size,
        vae_channels=tuple(self.vae_channels))


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """Training images (N, 3, 32, 32) float32 in [-1, 1], their prompts and token ids (N, T).

  `empty_ids` holds the CLIP and T5 ids (T,) of the empty prompt, which replaces a dropped prompt.
  """

  emoji: list[data.Emoji]
  images: np.ndarray
  clip_ids: np.ndarray
  t5_ids: np.ndarray
  empty_ids: tuple[np.ndarray, np.ndarray]


def prepare_data(config: TrainConfig, out: Path) -> TrainingData:
  """Renders the training split and writes the tokenizers (DIR/tokenizer, DIR/tokenizer_2)."""
  train, _ = data.split_emoji(data.select_emoji())
  if config.limit_images is not None:
    train = train[:config.limit_images]
  prompts = [e.prompt for e in train]
  base = demo_tokenizer.build_bpe(prompts, config.vocab_size)
  demo_tokenizer.save_tokenizer(demo_tokenizer.clip_tokenizer(base), out / "tokenizer")
  demo_tokenizer.save_tokenizer(demo_tokenizer.t5_tokenizer(base), out / "tokenizer_2")
  clip_ids, t5_ids = tokenize(out, prompts)
  empty_clip, empty_t5 = tokenize(out, [""])
  return TrainingData(train, data.to_model_range(data.render_all(train)), clip_ids, t5_ids,
                      (empty_clip[0], empty_t5[0]))


def tokenize(folder: Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """CLIP and T5 token ids (N, MAX_LENGTH) int32, as the pipeline tokenizes prompts."""
  clip = Tokenizer.from_pretrained(folder / "tokenizer")
  t5 = Tokenizer.from_pretrained(folder / "tokenizer_2")
  length = demo_tokenizer.MAX_LENGTH
  return clip(prompts, length).input_ids, t5(prompts, length).input_ids


def batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
  """Indices of batch `step`: consecutive slices of a seeded permutation of range(n) per epoch."""
  positions = np.arange(step * batch, (step + 1) * batch)
  epochs = positions // n
  out = np.empty(batch, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
    sel = epochs == epoch
    out[sel] = perm[positions[sel] % n]
  return out


# ----------------------------------------------------------------------------------------------
# Generic training loop with orbax checkpoints


@dataclasses.dataclass
class TrainState:
  """What a checkpoint holds: parameters, EMA parameters, optimizer state, step, base PRNG key."""

  params: Any
  ema: Any
  opt_state: Any
  step: int
  key: jax.Array

  def tree(self) -> dict:
    return {"params": flat_leaves(self.params), "ema": flat_leaves(self.ema),
            "opt_state": flat_leaves(self.opt_state), "step": np.asarray(self.step, np.int64),
            "key": jax.random.key_data(self.key)}


def restore_latest(folder: Path, template: TrainState) -> TrainState | None:
  """The newest checkpoint in `folder` restored into the structure of `template`, or None."""
  tree = restore_newest(folder, template.tree())
  if tree is None:
    return None
  return TrainState(params=unflat_leaves(template.params, tree["params"]),
                    ema=unflat_leaves(template.ema, tree["ema"]),
                    opt_state=unflat_leaves(template.opt_state, tree["opt_state"]),
                    step=int(tree["step"]), key=jax.random.wrap_key_data(tree["key"]))


def save_state(folder: Path, state: TrainState) -> None:
  """Writes `state` as checkpoint number `state.step` (keeps the newest two)."""
  save_step(folder, state.step, state.tree())


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """EMA with the usual warm start: decay min(decay, (1 + step) / (10 + step))."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def make_step(loss: Callable[..., jax.Array], optimizer: optax.GradientTransformation,
              ema_decay: float) -> Callable[..., Any]:
  """Jitted `step(params, ema, opt_state, step, key, *batch) -> (params, ema, opt_state, loss)`."""

  def step_fn(params, ema, opt_state, step, key, *batch):
    value, grads = jax.value_and_grad(loss)(params, *batch, jax.random.fold_in(key, step))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, ema_update(ema, params, step, ema_decay), opt_state, value

  return jax.jit(step_fn, donate_argnums=(0, 1, 2))


def _read_losses(file: Path, upto: int) -> list[tuple[int, float]]:
  if not file.exists():
    return []
  rows = [line.split(",") for line in file.read_text().splitlines() if line]
  return [(int(s), float(v)) for s, v in rows if int(s) < upto]


def run_loop(name: str, folder: Path, state: TrainState, step_fn: Callable[..., Any],
             batch_fn: Callable[[int], tuple], total: int, *, checkpoint_every: int,
             deadline: float | None, loss_file: Path) -> TrainState:
  """Steps `state` to `total` (or to the deadline), checkpointing every `checkpoint_every` steps.

  Appends "step,loss" lines to `loss_file` (rewritten on resume to the restored step).
  """
  losses = _read_losses(loss_file, state.step)
  loss_file.write_text("".join(f"{s},{v!r}\n" for s, v in losses))
  params, ema, opt_state = state.params, state.ema, state.opt_state
  step = state.step
  pending: list[tuple[int, jax.Array]] = []

  def flush() -> None:
    with loss_file.open("a") as f:
      f.writelines(f"{s},{float(v)!r}\n" for s, v in pending)
    pending.clear()

  with tqdm(total=total, initial=step, desc=name, unit="step", mininterval=30) as bar:
    while step < total:
      batch = batch_fn(step)
      params, ema, opt_state, loss = step_fn(params, ema, opt_state, jnp.int32(step), state.key,
                                             *batch)
      pending.append((step, loss))
      step += 1
      bar.update(1)
      out_of_time = deadline is not None and time.time() >= deadline
      if step % checkpoint_every == 0 or step == total or out_of_time:
        bar.set_postfix(loss=f"{float(loss):.4f}")
        flush()
        save_state(folder, TrainState(params, ema, opt_state, step, state.key))
      if out_of_time:
        break
  flush()
  return TrainState(params, ema, opt_state, step, state.key)


def _optimizer(lr: float | optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=weight_decay))


# ----------------------------------------------------------------------------------------------
# Stages


def train_vae(config: TrainConfig, training: TrainingData, out: Path, *,
              deadline: float | None = None) -> tuple[nnx.Module, int]:
  """Trains (or resumes, or reloads the finished) VAE; returns it (EMA weights) and its steps."""
  vae = architecture.build_vae(config.configs(), config.seed)
  graphdef, params = nnx.split(vae, nnx.Param)
  optimizer = _optimizer(optax.warmup_cosine_decay_schedule(
      0.0, config.vae_lr, min(50, config.vae_steps // 4 + 1), max(config.vae_steps, 1),
      config.vae_lr * 0.1), 0.0)
  template = TrainState(params, jax.tree.map(jnp.copy, params), optimizer.init(params), 0,
                        jax.random.key(config.seed + 100))
  folder = out / "checkpoints" / "vae"
  state = restore_latest(folder, template) or template
  images = training.images

  def batch_fn(step: int) -> tuple:
    idx = batch_indices(config.seed + 100, step, len(images), config.vae_batch)
    return (jnp.asarray(images[idx]),)

  step_fn = make_step(objectives.vae_loss_fn(graphdef, config.vae_latent_weight), optimizer, 0.99)
  if state.step < config.vae_steps:
    state = run_loop("vae", folder, state, step_fn, batch_fn, config.vae_steps,
                     checkpoint_every=config.checkpoint_every, deadline=deadline,
                     loss_file=out / "vae_loss.csv")
  return nnx.merge(graphdef, state.ema), state.step


def encode_latents(vae: nnx.Module, images: np.ndarray, batch: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Posterior mean and std of each image, each (N, 16, 8, 8) float32."""
  encode = nnx.jit(lambda m, x: m.encode(x))
  means, stds = [], []
  for i in range(0, len(images), batch):
    posterior = encode(vae, jnp.asarray(images[i:i + batch]))
    means.append(np.asarray(posterior.mean))
    stds.append(np.asarray(posterior.std))
  return np.concatenate(means), np.concatenate(stds)


def latent_normalization(mean: np.ndarray, std: np.ndarray) -> tuple[float, float]:
  """(shift_factor, scaling_factor) that make posterior samples zero-mean, unit-variance."""
  shift = float(mean.mean())
  variance = float(np.square(mean - shift).mean() + np.square(std).mean())
  return shift, 1.0 / math.sqrt(variance)


def with_normalization(vae: nnx.Module, shift: float, scale: float) -> nnx.Module:
  """The VAE with `shift_factor` / `scaling_factor` set in its config (same parameters)."""
  vae.config = dataclasses.replace(vae.config, shift_factor=round(shift, 6),
                                   scaling_factor=round(scale, 6))
  return vae


def train_denoiser(config: TrainConfig, training: TrainingData, latent_mean: np.ndarray,
                   latent_std: np.ndarray, vae: nnx.Module, out: Path, *,
                   deadline: float | None = None) -> tuple[dict[str, nnx.Module], int]:
  """Trains (or resumes) transformer + text encoders; returns them (EMA weights) and the steps."""
  modules = architecture.build_denoiser(config.configs(), config.seed)
  graphdefs, params = {}, {}
  for name, module in modules.items():
    graphdefs[name], params[name] = nnx.split(module, nnx.Param)
  schedule = optax.join_schedules(
      [optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup,
                                          max(config.steps, config.warmup + 1), config.lr * 0.05),
       optax.warmup_cosine_decay_schedule(0.0, config.lr * 0.5, config.warmup,
                                          max(config.guidance_steps, config.warmup + 1),
                                          config.lr * 0.05)],
      [config.steps])
  total_steps = config.steps + config.guidance_steps
  empty_clip, empty_t5 = training.empty_ids
  optimizer = _optimizer(schedule, config.weight_decay)
  template = TrainState(params, jax.tree.map(jnp.copy, params), optimizer.init(params), 0,
                        jax.random.key(config.seed))
  folder = out / "checkpoints" / "denoiser"
  state = restore_latest(folder, template) or template
  shift = vae.config.shift_factor or 0.0
  scale = vae.config.scaling_factor

  def batch_fn(step: int) -> tuple:
    idx = batch_indices(config.seed, step, len(latent_mean), config.batch)
    eps = np.random.default_rng([config.seed, 7, step]).standard_normal(
        latent_mean[idx].shape).astype(np.float32)
    latents = (latent_mean[idx] + latent_std[idx] * eps - shift) * scale
    clip_ids, t5_ids = training.clip_ids[idx], training.t5_ids[idx]
    if step >= config.steps:
      drop = np.random.default_rng([config.seed, 11, step]).random(len(idx)) < (
          config.guidance_dropout)
      clip_ids = np.where(drop[:, None], empty_clip, clip_ids)
      t5_ids = np.where(drop[:, None], empty_t5, t5_ids)
    return (jnp.asarray(latents), jnp.asarray(clip_ids), jnp.asarray(t5_ids))

  step_fn = make_step(objectives.flow_loss_fn(graphdefs), optimizer, config.ema_decay)
  if state.step < total_steps:
    state = run_loop("denoiser", folder, state, step_fn, batch_fn, total_steps,
                     checkpoint_every=config.checkpoint_every, deadline=deadline,
                     loss_file=out / "denoiser_loss.csv")
  return ({name: nnx.merge(graphdefs[name], state.ema[name]) for name in graphdefs},
          state.step)


# ----------------------------------------------------------------------------------------------
# Export


def model_index() -> dict:
  """model_index.json of the pipeline folder (diffusers' FluxPipeline layout)."""
  return {"_class_name": "FluxPipeline", "_diffusers_version": "0.35.0",
          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
          "text_encoder": ["transformers", "CLIPTextModel"],
          "text_encoder_2": ["transformers", "T5EncoderModel"],
          "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
          "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
          "transformer": ["diffusers", "FluxTransformer2DModel"],
          "vae": ["diffusers", "AutoencoderKL"]}


def export_pipeline(out: Path, modules: dict[str, nnx.Module], vae: nnx.Module) -> Path:
  """Writes DIR/pipeline: model_index.json, sample_defaults.json, scheduler, tokenizers and each
  component (ours)."""
  types = {"transformer": "flux", "text_encoder": "clip", "text_encoder_2": "t5", "vae": "vae"}
  with atomic_folder(out / PIPELINE_DIR, overwrite=True) as tmp:
    (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    (tmp / SAMPLE_DEFAULTS_FILE).write_text(json.dumps(sampling.SAMPLE_DEFAULTS, indent=2) + "\n")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(architecture.scheduler_config(), indent=2) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
      shutil.copytree(out / name, tmp / name)
    for name, module in {**modules, "vae": vae}.items():
      save_checkpoint(module, tmp / name, model_type=types[name], config=module.config)
  return out / PIPELINE_DIR


def plot_losses(out: Path) -> Path:
  """loss.png: the VAE and denoiser training losses (log scale, running mean) against the step."""
  panels = [("vae", _read_losses(out / "vae_loss.csv", 1 << 62)),
            ("denoiser", _read_losses(out / "denoiser_loss.csv", 1 << 62))]
  images = [plots.line_plot(np.array(rows, np.float64).reshape(-1, 2),
                            title=f"{name} training loss (log scale) against step")
            for name, rows in panels]
  canvas = Image.new("RGB", (sum(i.width for i in images), images[0].height), "white")
  x = 0
  for image in images:
    canvas.paste(image, (x, 0))
    x += image.width
  canvas.save(out / "loss.png")
  return out / "loss.png"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, required=True, help="run folder (created or resumed)")
  parser.add_argument("--stop-at", help="UTC wall-clock deadline HH:MM (today, or tomorrow)")
  parser.add_argument("--stage", choices=("vae", "all"), default="all")
  parser.add_argument("--limit-images", type=int, default=None, help="first N emoji (tests)")
  add_config_flags(parser, TrainConfig)
  args = parser.parse_args(argv)
  config = config_from_flags(TrainConfig, args)
  deadline = _deadline(args.stop_at) if args.stop_at else None
  out = args.out
  out.mkdir(parents=True, exist_ok=True)
  (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
  started = time.time()
  training = prepare_data(config, out)
  vae, vae_steps = train_vae(config, training, out, deadline=deadline)
  if args.stage == "vae" or vae_steps < config.vae_steps:
    return
  mean, _ = encode_latents(vae, training.images)
  std = np.zeros_like(mean)  # the autoencoder's latent is its posterior mean (no trained variance)
  vae = with_normalization(vae, *latent_normalization(mean, std))
  modules, steps = train_denoiser(config, training, mean, std, vae, out, deadline=deadline)
  pipeline = export_pipeline(out, modules, vae)
  plot_losses(out)
  sampling.sample_grid(pipeline, out / "samples.png")
  log = out / "sessions.csv"
  with log.open("a") as f:
    f.write(f"{datetime.datetime.now(datetime.UTC).isoformat()},{steps},"
            f"{time.time() - started:.0f}\n")


def _deadline(hhmm: str) -> float:
  now = datetime.datetime.now(datetime.UTC)
  hour, minute = (int(x) for x in hhmm.split(":"))
  target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
  if target < now - datetime.timedelta(hours=1):
    target += datetime.timedelta(days=1)
  return target.timestamp()


if __name__ == "__main__":
  main()
