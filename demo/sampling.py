"""Sampling the demo pipeline: the one place that builds the FluxPipeline of a run folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from demo import data
from demo.tokenizer import MAX_LENGTH
from pipelines import FluxPipeline, plots

NUM_STEPS = 20


def load_pipeline(folder: str | os.PathLike) -> FluxPipeline:
  """The demo's FluxPipeline from a pipeline folder (float32)."""
  return FluxPipeline.from_pretrained(folder)


def generate(pipeline: FluxPipeline, prompts: Sequence[str], *, seed: int = 0,
             num_steps: int = NUM_STEPS, batch: int = 32, loras=None) -> np.ndarray:
  """Images (N, 32, 32, 3) float32 in [0, 1], one per prompt; the seed of batch k is seed + k;
  `loras` as the pipeline's (file, strength) pairs."""
  out = []
  for k, i in enumerate(range(0, len(prompts), batch)):
    out.append(pipeline(list(prompts[i:i + batch]), height=data.IMAGE_SIZE,
                        width=data.IMAGE_SIZE, num_inference_steps=num_steps, seed=seed + k,
                        max_sequence_length=MAX_LENGTH, loras=loras))
  return np.concatenate(out)


def sample_grid(folder: str | os.PathLike, png: str | os.PathLike,
                prompts: Sequence[str] = data.EVAL_PROMPTS, *, seed: int = 0) -> np.ndarray:
  """Samples one image per prompt with the pipeline in `folder`, saves the labelled grid."""
  images = generate(load_pipeline(folder), prompts, seed=seed)
  plots.image_grid(images, list(prompts)).save(Path(png))
  return images
