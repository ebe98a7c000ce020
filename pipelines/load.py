"""Loading the pipeline a folder's model_index.json names.

Importing `convert.loading` registers the models' checkpoint loader (`models.pretrained`), so the
pipelines load their models whether or not the installed package's entry point is there.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

import convert.loading  # noqa: F401  (registers the loader every from_pretrained calls)
from pipelines.flux import FluxPipeline
from pipelines.folder import PipelineFolder
from pipelines.pixart import PixArtSigmaPipeline
from pipelines.sdxl import StableDiffusionXLPipeline

Pipeline = FluxPipeline | PixArtSigmaPipeline | StableDiffusionXLPipeline

PIPELINES = {"FluxPipeline": FluxPipeline, "PixArtSigmaPipeline": PixArtSigmaPipeline,
             "StableDiffusionXLPipeline": StableDiffusionXLPipeline}


def load_pipeline(path: str | os.PathLike | PipelineFolder, dtype: jnp.dtype | None = None,
                  **options) -> Pipeline:
  """The pipeline a folder names (read into a `PipelineFolder` unless it is one), loaded with its
  class's `from_pretrained(folder, dtype=dtype, **options)` (FluxPipeline: `shard_weights`,
  `devices`)."""
  folder = PipelineFolder.read(path)
  return PIPELINES[folder.pipeline].from_pretrained(folder, dtype=dtype, **options)


def image_size_multiple(path: str | os.PathLike) -> int:
  """What height and width must be multiples of for the pipeline in folder `path` (its
  `PipelineFolder.size_multiple`; no weight is read)."""
  return PipelineFolder.read(path).size_multiple
