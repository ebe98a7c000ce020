"""Quantizing a whole pipeline: calibrate its transformer on prompts, quantize it, write the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

import svdq_jax
from convert.checkpoint import atomic_folder, save_checkpoint
from convert.nunchaku_export import split_proj_out
from pipelines.flux import FluxPipeline
from pipelines.folder import PipelineFolder
from pipelines.inputs import check_image_size, prompt_list
from pipelines.load import load_pipeline
from pipelines.pixart import PixArtSigmaPipeline
from svdq_jax.config import NUNCHAKU_FUSED, NUNCHAKU_SHIFTED, QuantConfig
from svdq_jax.errors import InputError


def quantize_transformer(pipe: FluxPipeline | PixArtSigmaPipeline, config: Any,
                         prompts: str | Sequence[str], *, num_inference_steps: int = 4,
                         height: int = 512, width: int = 512, seed: int = 0,
                         progress: bool = True) -> None:
  """Calibrates `pipe.transformer` on prompts and quantizes it in place with `config`.

  Every prompt is sampled eagerly for `num_inference_steps` steps while `svdq_jax.calibrate`
  records the input of every linear layer at every step; `svdq_jax.quantize_model` then applies
  the config (a `QuantConfig`; its `skip` patterns keep the embedders and the final norm and
  projection in 16 bits). Progress bars run per prompt and per layer.
  """
  prompts = prompt_list(prompts)

  def run(prompt: str) -> None:
    pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps, seed=seed,
         output_type="latent", jit=False)

  stats = svdq_jax.calibrate(run, prompts, model=pipe.transformer, progress=progress)
  svdq_jax.quantize_model(pipe.transformer, stats, config, progress=progress)
  pipe._runners.clear()  # the quantized transformer has other parameter shapes


NUNCHAKU_PRESETS = ("svdquant-int4", "svdquant-nvfp4", "w4a4", "smoothquant-w4a4")
"""The presets `nunchaku_layout` accepts: W4A4 INT4 g64 or NVFP4 g16, what Nunchaku runs."""


def quantize_pipeline(src: str | os.PathLike | PipelineFolder, dst: str | os.PathLike, *,
                      preset: str, prompts: str | Sequence[str], num_inference_steps: int = 4,
                      height: int = 512, width: int = 512, seed: int = 0, overwrite: bool = False,
                      dtype: jnp.dtype | None = None, nunchaku_layout: bool = False,
                      progress: bool = True) -> Path:
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
    nunchaku_layout: quantize a FLUX transformer in the layout Nunchaku's files hold, so that
      `svdq-jax export-nunchaku` can write it: single blocks' proj_out split
      (`convert.nunchaku_export.split_proj_out`), q/k/v quantized as one layer
      (`QuantConfig.fused` = `NUNCHAKU_FUSED`) and INT4 inputs shifted exactly where Nunchaku
      shifts them (`QuantConfig.shifted` = `NUNCHAKU_SHIFTED`). Only with `NUNCHAKU_PRESETS`.
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
  if nunchaku_layout:
    if folder.pipeline != "FluxPipeline" or preset not in NUNCHAKU_PRESETS:
      raise InputError(f"quantize_pipeline: the Nunchaku layout needs a FluxPipeline and one of "
                       f"the presets {NUNCHAKU_PRESETS}, got {folder.pipeline} with {preset!r}")
    config = dataclasses.replace(config, fused=NUNCHAKU_FUSED, shifted=NUNCHAKU_SHIFTED)
  with atomic_folder(dst, overwrite=overwrite) as out:
    pipe = load_pipeline(folder, dtype=dtype)
    if nunchaku_layout:
      pipe.transformer = split_proj_out(pipe.transformer)
    quantize_transformer(pipe, config, prompts, num_inference_steps=num_inference_steps,
                         height=height, width=width, seed=seed, progress=progress)
    for entry in folder.path.iterdir():
      if entry.name == "transformer":
        continue
      copy = shutil.copytree if entry.is_dir() else shutil.copy2
      copy(entry, out / entry.name)
    save_checkpoint(pipe.transformer, out / "transformer", model_type=folder.transformer.entry.name,
                    config=pipe.transformer.config)
    quant_note = {"preset": preset, "nunchaku_layout": nunchaku_layout,
                  "quant_config": config.to_dict(), "calibration": {
        "prompts": len(prompts), "num_inference_steps": num_inference_steps, "height": height,
        "width": width, "seed": seed}}
    (out / "svdq_quantization.json").write_text(json.dumps(quant_note, indent=2) + "\n")
  return Path(dst)
