"""Quantizing a whole pipeline: calibrate its denoiser (the DiTs' transformer, SDXL's UNet) on
prompts, quantize it, write the folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import svdq_jax
from convert.checkpoint import atomic_folder, save_checkpoint
from convert.nunchaku_export import split_proj_out
from pipelines.folder import PipelineFolder
from pipelines.inputs import check_image_size, prompt_list
from pipelines.load import Pipeline, load_pipeline
from pipelines.quantize_stream import (
  check_streamable,
  quantize_pipeline_streamed,
  write_folder_rest,
)
from svdq_jax.config import NUNCHAKU_FUSED, NUNCHAKU_SHIFTED, QuantConfig
from svdq_jax.errors import InputError


def calibrate_denoiser(pipe: Pipeline, prompts: str | Sequence[str], *,
                       num_inference_steps: int = 4, height: int = 512, width: int = 512,
                       seed: int = 0, guidance_scale: float | None = None, batch_size: int = 1,
                       progress: bool = True, **sampling: Any
                       ) -> dict[str, svdq_jax.ActivationStats]:
  """The input statistics of every linear of `pipe.denoiser` (FLUX.1's and PixArt's transformer,
  SDXL's UNet), recorded by `svdq_jax.calibrate` while the prompts are sampled eagerly for
  `num_inference_steps` steps (every step recorded).

  guidance_scale: the runs' guidance (None: the pipeline's default; a guided pipeline calibrates
    on both branches; 0 for SDXL-Turbo, which samples without guidance).
  batch_size: prompts per eager run (a small model's eager steps cost about the same for a batch
    as for one prompt).
  sampling: further call arguments of the pipeline (FLUX.1: negative_prompt, true_cfg_scale,
    max_sequence_length).
  """
  prompts = prompt_list(prompts)
  if batch_size < 1:
    raise InputError(f"calibrate_denoiser: batch_size must be >= 1, got {batch_size}")
  batches = prompts if batch_size == 1 else [prompts[i:i + batch_size]
                                             for i in range(0, len(prompts), batch_size)]

  def run(batch: str | list[str]) -> None:
    pipe(batch, height=height, width=width, num_inference_steps=num_inference_steps, seed=seed,
         guidance_scale=guidance_scale, output_type="latent", jit=False, **sampling)

  return svdq_jax.calibrate(run, batches, model=pipe.denoiser, progress=progress)


def quantize_denoiser(pipe: Pipeline, config: Any, prompts: str | Sequence[str], *,
                      num_inference_steps: int = 4, height: int = 512, width: int = 512,
                      seed: int = 0, guidance_scale: float | None = None,
                      progress: bool = True,
                      devices: Sequence[jax.Device] | int | None = None,
                      **sampling: Any) -> None:
  """Calibrates `pipe.denoiser` on prompts (`calibrate_denoiser`, same arguments) and quantizes it
  in place with `config`, its layers spread over `devices` (`svdq_jax.quantize_model`; None:
  every local device; the calibration runs on the default device).

  `svdq_jax.quantize_model` applies the config (a `QuantConfig`; its `skip` patterns keep the
  embedders, the final norm and projection, and the UNet's projections, cross-attention
  key/value and ResNet time projections in 16 bits). Progress bars run per prompt and per layer.
  """
  devices = svdq_jax.quantize_devices(devices)
  stats = calibrate_denoiser(pipe, prompts, num_inference_steps=num_inference_steps,
                             height=height, width=width, seed=seed,
                             guidance_scale=guidance_scale, progress=progress, **sampling)
  svdq_jax.quantize_model(pipe.denoiser, stats, config, progress=progress, devices=devices)
  pipe._runners.clear()  # the quantized denoiser has other parameter shapes


NUNCHAKU_PRESETS = ("svdquant-int4", "svdquant-nvfp4", "w4a4", "smoothquant-w4a4")
"""The presets `nunchaku_layout` accepts: W4A4 INT4 g64 or NVFP4 g16, what Nunchaku runs."""


def quantize_pipeline(src: str | os.PathLike | PipelineFolder, dst: str | os.PathLike, *,
                      preset: str, prompts: str | Sequence[str], num_inference_steps: int = 4,
                      height: int | None = None, width: int | None = None, seed: int = 0,
                      guidance_scale: float | None = None, overwrite: bool = False,
                      dtype: jnp.dtype | None = None, nunchaku_layout: bool = False,
                      progress: bool = True, stream: bool = False,
                      devices: Sequence[jax.Device] | int | None = None) -> Path:
  """Writes a copy of a pipeline folder with its denoiser (transformer/ or unet/) calibrated and
  quantized.

  `dst` gets the source folder's other components unchanged and the denoiser as our
  checkpoint, so `load_pipeline(dst)` (and `svdq-jax sample dst`) reads it directly; the preset
  and calibration settings are recorded in `dst/svdq_quantization.json`.

  Args:
    src: diffusers pipeline folder (or ours), or its `PipelineFolder` record.
    dst: output folder, written atomically (replaced only with `overwrite`).
    preset: a `QuantConfig.preset` name, e.g. "svdquant-int4".
    prompts: calibration prompts, one eager sampling run each (a string is one prompt).
    num_inference_steps, height, width, seed, guidance_scale: the calibration runs' sampling
      settings (guidance None: the pipeline's default; 0 for SDXL-Turbo, which samples without
      guidance). height, width and guidance default to the folder's sample_defaults.json (else
      512, 512 and the pipeline's default); its negative prompt, true CFG scale and sequence
      length apply to the calibration runs too.
    dtype: the models' dtype during calibration (None: float32); the unquantized layers of the
      written denoiser keep it.
    nunchaku_layout: quantize a FLUX transformer in the layout Nunchaku's files hold, so that
      `svdq-jax export-nunchaku` can write it: single blocks' proj_out split
      (`convert.nunchaku_export.split_proj_out`), q/k/v quantized as one layer
      (`QuantConfig.fused` = `NUNCHAKU_FUSED`) and INT4 inputs shifted exactly where Nunchaku
      shifts them (`QuantConfig.shifted` = `NUNCHAKU_SHIFTED`). Only with `NUNCHAKU_PRESETS`.
    progress: progress bars per prompt and per layer.
    stream: hold one float transformer block at a time (FluxPipeline folders with a diffusers
      transformer): `pipelines.quantize_stream`, same result layer by layer.
    devices: the devices the layers are quantized on (`svdq_jax.quantize_devices`; None: every
      local device); the result is the same on any number of them.

  Returns:
    The written folder.

  Raises:
    InputError, before any model is loaded, for an unknown preset, bad prompts, bad `devices`, a
    bad `src` folder (CheckpointError), a size the pipeline cannot make or an existing `dst` without
    `overwrite` (checked by `atomic_folder` as it starts).
  """
  config = QuantConfig.preset(preset)
  prompts = prompt_list(prompts)
  devices = svdq_jax.quantize_devices(devices)
  folder = PipelineFolder.read(src)
  sampling = dict(folder.sample_defaults)
  height = sampling.pop("height", 512) if height is None else height
  width = sampling.pop("width", 512) if width is None else width
  guidance_scale = sampling.pop("guidance_scale", None) if guidance_scale is None else (
      guidance_scale)
  sampling = {k: v for k, v in sampling.items()
              if k in ("negative_prompt", "true_cfg_scale", "max_sequence_length")}
  check_image_size(f"quantize_pipeline {str(folder.path)!r}", height, width, folder.size_multiple)
  if nunchaku_layout:
    if folder.pipeline != "FluxPipeline" or preset not in NUNCHAKU_PRESETS:
      raise InputError(f"quantize_pipeline: the Nunchaku layout needs a FluxPipeline and one of "
                       f"the presets {NUNCHAKU_PRESETS}, got {folder.pipeline} with {preset!r}")
    config = dataclasses.replace(config, fused=NUNCHAKU_FUSED, shifted=NUNCHAKU_SHIFTED)
  if stream:
    check_streamable(folder)
    return quantize_pipeline_streamed(
        folder, dst, config=config, preset=preset, prompts=prompts,
        num_inference_steps=num_inference_steps, height=height, width=width, seed=seed,
        guidance_scale=guidance_scale, overwrite=overwrite, dtype=dtype,
        nunchaku_layout=nunchaku_layout, progress=progress, sampling=sampling, devices=devices)
  with atomic_folder(dst, overwrite=overwrite) as out:
    pipe = load_pipeline(folder, dtype=dtype)
    if nunchaku_layout:
      pipe.transformer = split_proj_out(pipe.transformer)
    quantize_denoiser(pipe, config, prompts, num_inference_steps=num_inference_steps,
                      height=height, width=width, seed=seed, guidance_scale=guidance_scale,
                      progress=progress, devices=devices, **sampling)
    save_checkpoint(pipe.denoiser, out / folder.denoiser_name,
                    model_type=folder.denoiser.entry.name, config=pipe.denoiser.config)
    write_folder_rest(folder, out, preset=preset, config=config,
                      nunchaku_layout=nunchaku_layout, stream=False, calibration={
        "prompts": len(prompts), "num_inference_steps": num_inference_steps, "height": height,
        "width": width, "seed": seed, "guidance_scale": guidance_scale})
  return Path(dst)
