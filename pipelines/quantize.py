"""Quantizing a whole pipeline: calibrate its transformer on prompts, quantize it, write the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

import svdq_jax
from convert.checkpoint import atomic_folder, save_checkpoint
from pipelines.flux import FluxPipeline
from pipelines.folder import PipelineFolder
from pipelines.inputs import check_image_size, prompt_list
from pipelines.load import load_pipeline
from pipelines.pixart import PixArtSigmaPipeline
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError


def calibrate_transformer(pipe: FluxPipeline | PixArtSigmaPipeline, prompts: str | Sequence[str],
                          *, num_inference_steps: int = 4, height: int = 512, width: int = 512,
                          seed: int = 0, max_sequence_length: int | None = None,
                          batch_size: int = 1, progress: bool = True
                          ) -> dict[str, svdq_jax.ActivationStats]:
  """The input statistics of every linear of `pipe.transformer`, recorded by `svdq_jax.calibrate`
  while the prompts are sampled eagerly for `num_inference_steps` steps (every step recorded).

  max_sequence_length: text tokens of the calibration runs (None: the pipeline's default).
  batch_size: prompts per eager run (a small model's eager steps cost about the same for a batch
    as for one prompt).
  """
  prompts = prompt_list(prompts)
  if batch_size < 1:
    raise InputError(f"calibrate_transformer: batch_size must be >= 1, got {batch_size}")
  length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
  batches = prompts if batch_size == 1 else [prompts[i:i + batch_size]
                                             for i in range(0, len(prompts), batch_size)]

  def run(batch: str | list[str]) -> None:
    pipe(batch, height=height, width=width, num_inference_steps=num_inference_steps, seed=seed,
         output_type="latent", jit=False, **length)

  return svdq_jax.calibrate(run, batches, model=pipe.transformer, progress=progress)


def quantize_transformer(pipe: FluxPipeline | PixArtSigmaPipeline, config: Any,
                         prompts: str | Sequence[str], *, num_inference_steps: int = 4,
                         height: int = 512, width: int = 512, seed: int = 0,
                         max_sequence_length: int | None = None, progress: bool = True) -> None:
  """Calibrates `pipe.transformer` on prompts and quantizes it in place with `config`.

  `calibrate_transformer` records the input of every linear layer at every step;
  `svdq_jax.quantize_model` then applies the config (a `QuantConfig`; its `skip` patterns keep the
  embedders and the final norm and projection in 16 bits). Progress bars run per prompt and per
  layer.
  """
  stats = calibrate_transformer(pipe, prompts, num_inference_steps=num_inference_steps,
                                height=height, width=width, seed=seed,
                                max_sequence_length=max_sequence_length, progress=progress)
  svdq_jax.quantize_model(pipe.transformer, stats, config, progress=progress)
  pipe._runners.clear()  # the quantized transformer has other parameter shapes


def quantize_pipeline(src: str | os.PathLike | PipelineFolder, dst: str | os.PathLike, *,
                      preset: str, prompts: str | Sequence[str], num_inference_steps: int = 4,
                      height: int = 512, width: int = 512, seed: int = 0, overwrite: bool = False,
                      dtype: jnp.dtype | None = None, progress: bool = True) -> Path:
  """Writes a copy of a pipeline folder with its transformer calibrated and quantized.

  `dst` gets the source folder's other components unchanged and the transformer as our
  checkpoint, so `load_pipeline(dst)` (and `svdq-jax sample dst`) reads it directly; the preset
  and calibration settings are recorded in `dst/svdq_quantization.json`.

  Args:
    src: diffusers pipeline folder (or ours), or its `PipelineFolder` record.
    dst: output folder, written atomically (replaced only with `overwrite`).
    preset: a `QuantConfig.preset` name, e.g. "svdquant-int4".
    prompts: calibration prompts, one eager sampling run each (a string is one prompt).
    num_inference_steps, height, width, seed: the calibration runs' sampling settings.
    dtype: the models' dtype during calibration (None: float32); the unquantized layers of the
      written transformer keep it.
    progress: progress bars per prompt and per layer.

  Returns:
    The written folder.

  Raises:
    InputError, before any model is loaded, for an unknown preset, bad prompts, a bad `src`
    folder (CheckpointError), a size the pipeline cannot make or an existing `dst` without
    `overwrite` (checked by `atomic_folder` as it starts).
  """
  config = QuantConfig.preset(preset)
  prompts = prompt_list(prompts)
  folder = PipelineFolder.read(src)
  check_image_size(f"quantize_pipeline {str(folder.path)!r}", height, width, folder.size_multiple)
  with atomic_folder(dst, overwrite=overwrite) as out:
    pipe = load_pipeline(folder, dtype=dtype)
    quantize_transformer(pipe, config, prompts, num_inference_steps=num_inference_steps,
                         height=height, width=width, seed=seed, progress=progress)
    for entry in folder.path.iterdir():
      if entry.name == "transformer":
        continue
      copy = shutil.copytree if entry.is_dir() else shutil.copy2
      copy(entry, out / entry.name)
    save_checkpoint(pipe.transformer, out / "transformer", model_type=folder.transformer.entry.name,
                    config=pipe.transformer.config)
    quant_note = {"preset": preset, "quant_config": config.to_dict(), "calibration": {
        "prompts": len(prompts), "num_inference_steps": num_inference_steps, "height": height,
        "width": width, "seed": seed}}
    (out / "svdq_quantization.json").write_text(json.dumps(quant_note, indent=2) + "\n")
  return Path(dst)
