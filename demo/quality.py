"""Image quality of the demo model under every quantization preset (the paper's Table 1 analogue).

The float pipeline is loaded once and its transformer calibrated once, on training names that are
not evaluation prompts (`calibration_prompts`), with `pipelines.calibrate_denoiser`, the call
`svdq-jax quantize` makes. Each preset then quantizes a copy of the float transformer
(`svdq_jax.quantize_model`) and samples the same prompts with the same seeds. Measured per preset,
the float model ("float", the reference row) included:

    bytes               the transformer's parameters as stored (4-bit codes, scales, low-rank
                        branch and the layers that stay 16/32-bit)
    psnr                dB against the float model's images of the same prompts and seeds (the
                        mean square error over all of them; None for the reference itself, inf
                        for identical images)
    lpips               LPIPS-like distance of the classifier's feature maps to the float image
                        (`svdq_jax.metrics.feature_map_distance`), averaged
    fid                 Frechet distance of the classifier's penultimate features between the
                        images and the real renders of the same prompts (FID-like)
    accuracy            share of images the classifier assigns to their prompt
    seconds_per_image   sampling wall time per image, measured on the batches after the first
                        (the first compiles the loop)

Prompts that are not a classifier label count in bytes, psnr, lpips and time but not in fid and
accuracy (None when fewer than two, or no, prompts are labels).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import svdq_jax
from convert.checkpoint import atomic_folder
from demo import classifier, data, sampling
from pipelines import FluxPipeline, calibrate_denoiser, plots
from pipelines.folder import PipelineFolder
from pipelines.inputs import check_image_size, prompt_list
from svdq_jax import metrics
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError
from svdq_jax.evaluation import ALL_PRESETS

DEFAULT_MODEL = Path(__file__).parent / "emoji_flux"
DEFAULT_CLASSIFIER = Path(__file__).parent / "emoji_classifier"
REFERENCE = "float"
NUM_PROMPTS = 16
DEFAULT_PROMPTS = data.EVAL_PROMPTS[:NUM_PROMPTS]
NUM_CALIBRATION_PROMPTS = 8
CALIBRATION_STEPS = 4
RESULT_KEYS = ("preset", "bytes", "psnr", "lpips", "fid", "accuracy", "seconds_per_image")


@dataclasses.dataclass(frozen=True)
class PresetResult:
  """One row of the table (see the module docstring for what each number is)."""

  preset: str
  bytes: int
  psnr: float | None
  lpips: float
  fid: float | None
  accuracy: float | None
  seconds_per_image: float

  def to_json(self) -> dict[str, Any]:
    """The row as a JSON object with `RESULT_KEYS`; a non-finite number (the PSNR of identical
    images) becomes None."""
    row = dataclasses.asdict(self)
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in row.items()}


@dataclasses.dataclass(frozen=True)
class QualityReport:
  """The rows (the reference first), the images (N, 32, 32, 3) float32 in [0, 1] of each row in
  the same order, and the settings they were made with."""

  prompts: tuple[str, ...]
  results: tuple[PresetResult, ...]
  images: tuple[np.ndarray, ...]
  settings: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Checking the inputs (before anything is loaded)


def check_presets(presets: Sequence[str]) -> tuple[str, ...]:
  """The presets, each a `QuantConfig` preset name; InputError for an unknown or repeated one, or
  none at all."""
  presets = tuple(presets)
  if not presets:
    raise InputError("no preset given (known presets: " + ", ".join(ALL_PRESETS) + ")")
  for name in presets:
    QuantConfig.preset(name)
  repeated = sorted({p for p in presets if presets.count(p) > 1})
  if repeated:
    raise InputError(f"presets {repeated} are given more than once")
  return presets


def check_model(path: str | os.PathLike) -> PipelineFolder:
  """The demo pipeline folder record; InputError when it is missing (saying so for the packaged
  default, which ships with the package once trained), damaged or not a 32x32 FluxPipeline."""
  path = Path(path)
  if not path.exists():
    if path.absolute() == DEFAULT_MODEL.absolute():
      raise InputError(f"the packaged demo model {path} is missing (it is not trained and "
                       "committed yet); pass --model DIR, a FluxPipeline folder")
    raise InputError(f"model folder {str(path)!r} does not exist")
  folder = PipelineFolder.read(path)
  if folder.pipeline != "FluxPipeline":
    raise InputError(f"{path}: a {folder.pipeline}, the demo needs a FluxPipeline folder")
  check_image_size(f"demo model {str(path)!r}", data.IMAGE_SIZE, data.IMAGE_SIZE,
                   folder.size_multiple)
  return folder


# ----------------------------------------------------------------------------------------------
# The classifier's measurements


@dataclasses.dataclass(frozen=True)
class Judge:
  """The emoji classifier with its labels and the labels' renders (N, 32, 32, 3) uint8."""

  model: classifier.EmojiClassifier
  labels: tuple[str, ...]
  renders: np.ndarray

  @classmethod
  def load(cls, folder: str | os.PathLike) -> Judge:
    """From a classifier folder (`demo.classifier.save_classifier`, with renders.png)."""
    model, labels = classifier.load_classifier(folder)
    return cls(model, tuple(labels), classifier.load_renders(folder, len(labels)))

  @functools.cached_property
  def _read(self) -> Any:
    """images (N, 32, 32, 3) -> (classes (N,), penultimate features (N, D), feature maps), in one
    jitted call (compiled once per batch size)."""
    return nnx.jit(lambda m, x: (jnp.argmax(m(x), axis=-1), m.features(x), m.feature_maps(x)))

  def read(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[jax.Array]]:
    """(classes, features float64, feature maps) of images (N, 32, 32, 3) in [0, 1]."""
    classes, features, maps = self._read(self.model, jnp.asarray(images, jnp.float32))
    return np.asarray(classes), np.asarray(features, np.float64), list(maps)

  def label_indices(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `prompts` of the prompts that are labels, their label indices)."""
    index = {label: i for i, label in enumerate(self.labels)}
    known = [i for i, p in enumerate(prompts) if p in index]
    return np.array(known, int), np.array([index[prompts[i]] for i in known], int)

  def real_features(self, prompts: Sequence[str]) -> np.ndarray:
    """Penultimate features of the renders of the prompts that are labels (N_labels, D)."""
    _, targets = self.label_indices(prompts)
    if not len(targets):
      return np.zeros((0, self.model.config.widths[-1]))
    return self.read(self.renders[targets].astype(np.float32) / 255)[1]

  def scores(self, images: np.ndarray, prompts: Sequence[str], reference_maps: list[jax.Array],
             real_features: np.ndarray) -> tuple[float, float | None, float | None]:
    """(lpips, fid, accuracy) of images (N, 32, 32, 3) made for `prompts`: the LPIPS-like distance
    of their feature maps to `reference_maps` (averaged), the Frechet distance of the features of
    the images whose prompt is a label to `real_features` (their renders'; None for fewer than
    two), and the share of those classified as their prompt (None for none)."""
    classes, features, maps = self.read(images)
    lpips = float(jnp.mean(metrics.feature_map_distance(maps, reference_maps)))
    rows, targets = self.label_indices(prompts)
    accuracy = metrics.prompt_accuracy(classes[rows], targets) if len(rows) else None
    fid = (metrics.frechet_distance(features[rows], real_features) if len(rows) >= 2 else None)
    return lpips, fid, accuracy


# ----------------------------------------------------------------------------------------------
# Sampling and quantizing


def calibration_prompts(labels: Sequence[str], count: int = NUM_CALIBRATION_PROMPTS,
                        exclude: Sequence[str] = data.EVAL_PROMPTS) -> list[str]:
  """`count` training names, evenly spaced over the subset's labels (code-point order), none of
  them held out (`demo.data.is_held_out`) or in `exclude` (the evaluation prompts)."""
  names = [p for i, p in enumerate(labels)
           if not data.is_held_out(i, p) and p not in set(exclude)]
  if len(names) < count:
    raise InputError(f"calibration_prompts: {len(names)} training names, {count} asked for")
  return [names[round(i * len(names) / count)] for i in range(count)]


def sample(pipe: FluxPipeline, prompts: Sequence[str], *, seed: int, num_steps: int,
           progress: bool = True, desc: str = "sample") -> tuple[np.ndarray, float]:
  """(images (N, 32, 32, 3) float32 in [0, 1], seconds per image).

  The prompts run in two batches (batch k with seed + k; the last is padded with its last prompt
  to the same shape), so the second call reuses the first one's compiled loop and its wall time
  per image is the steady-state time; a single prompt is sampled twice for the same reason.
  """
  batch = max(1, -(-len(prompts) // 2))
  chunks = [list(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
  if len(chunks) == 1:
    chunks = chunks * 2
  images, seconds = [], []
  for k, chunk in enumerate(tqdm(chunks, desc=desc, unit="batch", disable=not progress,
                                 leave=False)):
    padded = chunk + chunk[-1:] * (batch - len(chunk))
    start = time.perf_counter()
    out = pipe(padded, seed=seed + k, **{**sampling.SAMPLE_DEFAULTS,
                                          "num_inference_steps": num_steps})
    seconds.append((time.perf_counter() - start) / batch)
    images.append(out[:len(chunk)])
  if len(prompts) == 1:
    images = images[:1]
  return np.concatenate(images), float(np.mean(seconds[1:]))


def transformer_bytes(transformer: nnx.Module) -> int:
  """Bytes of the transformer's parameters as stored (`svdq_jax.metrics.model_bytes`)."""
  return metrics.model_bytes(nnx.state(transformer, nnx.Param))


def measure(model: str | os.PathLike, judge: Judge, *, presets: Sequence[str] = ALL_PRESETS,
            prompts: Sequence[str] = DEFAULT_PROMPTS, seed: int = 0,
            num_steps: int = sampling.NUM_STEPS,
            num_calibration_prompts: int = NUM_CALIBRATION_PROMPTS,
            calibration_steps: int = CALIBRATION_STEPS, progress: bool = True) -> QualityReport:
  """Samples `prompts` with the float model and with every preset, and measures each (the module
  docstring says how).

  Raises:
    InputError before any model is loaded for an unknown preset, bad prompts or a missing or
    damaged model folder; CheckpointError (an InputError) for damaged weights as they load;
    NonFiniteError when a preset's sampling overflows.
  """
  presets = check_presets(presets)
  prompts = tuple(prompt_list(prompts))
  folder = check_model(model)
  calibration = calibration_prompts(judge.labels, num_calibration_prompts)
  pipe = FluxPipeline.from_pretrained(folder)
  float_transformer = nnx.clone(pipe.transformer)
  stats = calibrate_denoiser(pipe, calibration, num_inference_steps=calibration_steps,
                             seed=seed, batch_size=len(calibration), progress=progress,
                             **{k: v for k, v in sampling.SAMPLE_DEFAULTS.items()
                                if k != "num_inference_steps"})
  real_features = judge.real_features(prompts)
  rows, images = [], []
  reference = reference_maps = None
  bar = tqdm([REFERENCE, *presets], desc="presets", unit="preset", disable=not progress)
  for name in bar:
    bar.set_postfix_str(name)
    transformer = nnx.clone(float_transformer)
    if name != REFERENCE:
      svdq_jax.quantize_model(transformer, stats, QuantConfig.preset(name), progress=progress)
    run = pipe.with_transformer(transformer)
    out, seconds = sample(run, prompts, seed=seed, num_steps=num_steps, progress=progress,
                          desc=f"sample {name}")
    if reference is None:
      reference, reference_maps = out, judge.read(out)[2]
    lpips, fid, accuracy = judge.scores(out, prompts, reference_maps, real_features)
    psnr = None if name == REFERENCE else metrics.psnr(out, reference)
    rows.append(PresetResult(preset=name, bytes=transformer_bytes(transformer), psnr=psnr,
                             lpips=lpips, fid=fid, accuracy=accuracy, seconds_per_image=seconds))
    images.append(out)
  settings = {"model": str(Path(model).absolute()), "prompts": list(prompts), "seed": seed,
              "num_inference_steps": num_steps, "calibration_prompts": calibration,
              "calibration_steps": calibration_steps, "backend": jax.default_backend()}
  return QualityReport(prompts, tuple(rows), tuple(images), settings)


# ----------------------------------------------------------------------------------------------
# Output


def _number(value: float | None, spec: str) -> str:
  if value is None:
    return "-"
  return "inf" if math.isinf(value) else format(value, spec)


def format_table(results: Sequence[PresetResult]) -> str:
  """A markdown table, one row per preset."""
  lines = ["| preset | transformer MB | PSNR dB | LPIPS-like | FID-like | prompt accuracy | "
           "s / image |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r.preset} | {r.bytes / 1e6:.3f} | {_number(r.psnr, '.2f')} | "
                 f"{r.lpips:.4f} | {_number(r.fid, '.2f')} | {_number(r.accuracy, '.3f')} | "
                 f"{r.seconds_per_image:.3f} |")
  return "\n".join(lines)


def caption(r: PresetResult) -> list[str]:
  """The lines that label a preset's row of the grid."""
  title = f"{r.preset} (reference)" if r.preset == REFERENCE else r.preset
  return [title, f"{r.bytes / 1e6:.2f} MB  {r.seconds_per_image:.2f} s/img",
          f"PSNR {_number(r.psnr, '.1f')}  LPIPS {r.lpips:.3f}",
          f"FID {_number(r.fid, '.1f')}  acc {_number(r.accuracy, '.2f')}"]


def write_report(report: QualityReport, out: str | os.PathLike) -> Path:
  """Writes out/grid.png (one row per preset, one column per prompt) and out/results.json (a list
  of objects with `RESULT_KEYS`), atomically: into a temporary folder beside `out`, then renamed,
  so an existing `out` is replaced only when both files are written."""
  grid = plots.labelled_rows([caption(r) for r in report.results], list(report.images),
                             list(report.prompts))
  with atomic_folder(out, overwrite=True) as tmp:
    grid.save(tmp / "grid.png")
    (tmp / "results.json").write_text(
        json.dumps([r.to_json() for r in report.results], indent=2) + "\n", encoding="utf-8")
  return Path(out)
