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


def quantize_transformer(pipe: FluxPipeline | PixArtSigmaPipeline, config: Any,
                         prompts: str | Sequence[str], *, num_inference_steps: int = 4,
                         height: int = 512, width: int = 512, seed: int = 0,
                         progress: bool = True, **sampling: Any) -> None:
  """Calibrates `pipe.transformer` on prompts and quantizes it in place with `config`.

  Every prompt is sampled eagerly for `num_inference_steps` steps while `svdq_jax.calibrate`
  records the input of every linear layer at every step; `svdq_jax.quantize_model` then applies
  the config (a `QuantConfig`; its `skip` patterns keep the embedders and the final norm and
  projection in 16 bits). Progress bars run per prompt and per layer. `sampling` holds further
  call arguments of the pipeline (negative_prompt, true_cfg_scale, max_sequence_length).
  """
  prompts = prompt_list(prompts)

  def run(prompt: str) -> None:
    pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps, seed=seed,
         output_type="latent", jit=False, **sampling)

  stats = svdq_jax.calibrate(run, prompts, model=pipe.transformer, progress=progress)
  svdq_jax.quantize_model(pipe.transformer, stats, config, progress=progress)
  pipe._runners.clear()  # the quantized transformer has other parameter shapes


def quantize_pipeline(src: str | os.PathLike | PipelineFolder, dst: str | os.PathLike, *,
                      preset: str, prompts: str | Sequence[str], num_inference_steps: int = 4,
                      height: int | None = None, width: int | None = None, seed: int = 0,
                      overwrite: bool = False,
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
    num_inference_steps, height, width, seed: the calibration runs' sampling settings; height
      and width default to the folder's sample_defaults.json, else 512. Its other settings
      (negative prompt, true CFG scale, sequence length) apply to the calibration runs too.
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
  sampling = dict(folder.sample_defaults)
  height = sampling.pop("height", 512) if height is None else height
  width = sampling.pop("width", 512) if width is None else width
  sampling = {k: v for k, v in sampling.items()
              if k in ("negative_prompt", "true_cfg_scale", "max_sequence_length")}
  check_image_size(f"quantize_pipeline {str(folder.path)!r}", height, width, folder.size_multiple)
  with atomic_folder(dst, overwrite=overwrite) as out:
    pipe = load_pipeline(folder, dtype=dtype)
    quantize_transformer(pipe, config, prompts, num_inference_steps=num_inference_steps,
                         height=height, width=width, seed=seed, progress=progress, **sampling)
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
