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
TRUE_CFG_SCALE = 4.0
SAMPLE_DEFAULTS = {"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE,
                   "num_inference_steps": NUM_STEPS, "max_sequence_length": MAX_LENGTH,
                   "negative_prompt": "", "true_cfg_scale": TRUE_CFG_SCALE}
"""How the demo model samples (its folder's sample_defaults.json): 32x32, 12 text tokens, true
classifier-free guidance against the empty prompt (it was trained with 10% of prompts dropped)."""


def load_pipeline(folder: str | os.PathLike) -> FluxPipeline:
  """The demo's FluxPipeline from a pipeline folder (float32 from a diffusers-layout folder such
  as the shipped one; a folder converted by svdq-jax keeps its stored dtypes)."""
  return FluxPipeline.from_pretrained(folder)


def generate(pipeline: FluxPipeline, prompts: Sequence[str], *, seed: int = 0,
             batch: int = 32, **settings: object) -> np.ndarray:
  """Images (N, 32, 32, 3) float32 in [0, 1], one per prompt; the seed of batch k is seed + k.

  `settings` override `SAMPLE_DEFAULTS` (e.g. true_cfg_scale=1.0 for no guidance) or add
  pipeline arguments (loras=[(file, strength)]).
  """
  settings = {**SAMPLE_DEFAULTS, **settings}
  out = []
  for k, i in enumerate(range(0, len(prompts), batch)):
    out.append(pipeline(list(prompts[i:i + batch]), seed=seed + k, **settings))
  return np.concatenate(out)


def sample_grid(folder: str | os.PathLike, png: str | os.PathLike,
                prompts: Sequence[str] = data.EVAL_PROMPTS, *, seed: int = 0) -> np.ndarray:
  """Samples one image per prompt with the pipeline in `folder`, saves the labelled grid."""
  images = generate(load_pipeline(folder), prompts, seed=seed)
  plots.image_grid(images, list(prompts)).save(Path(png))
  return images
