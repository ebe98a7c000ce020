"""Streamed quantization of a FLUX.1 pipeline: one float transformer block in memory at a time.

`quantize_pipeline(..., stream=True)` (`svdq-jax quantize --stream`) runs this instead of loading
the whole float transformer (47.6 GB for FLUX.1-dev in float32, 23.8 GB in bf16). What it holds:
the text encoders only while the prompts are encoded (then released), the transformer's small
parts outside its blocks (embedders, final norm and projection: 0.07 B parameters for FLUX.1), one
block read from the safetensors, the cached activations, and the quantized blocks done so far
(host memory; 6.7 GB for FLUX.1-dev with the default preset), which are written at the end as our
checkpoint (`convert.checkpoint.write_into`; orbax writes one tree, so there is no block-by-block
writer), atomically.

Order (DeepCompressor's, with its float trajectory computed here rather than by a whole loaded
model):

1. Trajectory. The calibration runs' latents at step i+1 need the whole model's output at step
   i, so the denoising loop runs step by step over all runs in lockstep: per step, the inputs of
   block 0 are computed from the latents (`FluxTransformer.embed`) and cached (hidden states,
   text hidden states, temb and the rotary cos/sin, per run and step), then every block is read,
   applied to every run's activations and released, then the final layers give the velocity and
   the scheduler steps. That reads the blocks once per step (`num_inference_steps` passes).
2. Calibration, block by block, on the cache: block b is read, applied to the cached inputs of
   every (run, step) while its linears' inputs are recorded (`svdq_jax.calibration.Recorder`, the
   recorder `calibrate` uses), quantized with those statistics (`svdq_jax.quantize_params`), its
   outputs replace the cache (the inputs of block b+1), and it is released.

Which activations calibrate block b+1: the float model's. The outputs that become block b+1's
inputs are those of the float block b, computed before it is quantized. DeepCompressor does the
same: it caches the transformer's inputs from float pipeline runs at every step and its
layer-by-layer loader (`iter_layer_activations`) forwards each block on the cached outputs of the
previous one before the caller smooths or quantizes it. Reasons: SVDQuant's per-layer objective
(the smoothing search and the low-rank refinement minimize the layer's output error against the
float output on its inputs) is defined on the float model's input distribution; it makes the
streamed result independent of the order blocks are done in and equal, layer by layer, to the
whole-model path (`svdq_jax.calibrate` on the float transformer), which is what the tests check;
and feeding quantized outputs forward would make every block's statistics depend on the 4-bit
rounding of all earlier ones without the objective accounting for it. The computations are the
same eager calls in the same order per layer as the whole-model path, so the statistics are
bit-identical.

Cost: the float forward runs twice (trajectory, calibration) and the blocks are read
`num_inference_steps + 1` times; the cache holds runs x steps x (text + image tokens) x width
activations (plus the current block's outputs while it runs).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import svdq_jax
from convert import flux as flux_converter
from convert import mapping, registry
from convert.checkpoint import atomic_folder, write_into
from convert.safetensors_io import CheckpointReader
from convert.state import load_into, path_str
from models import schedulers
from models.clip import CLIPTextModel
from models.flux import (
  FluxConfig,
  FluxSingleTransformerBlock,
  FluxTransformer,
  FluxTransformerBlock,
)
from models.t5 import T5Encoder
from models.tokenizers import Tokenizer
from pipelines.flux import FluxPipeline, latent_image_ids, pack_latents
from pipelines.folder import PipelineFolder
from pipelines.loop import NonFiniteError, jit_module
from svdq_jax.calibration import ActivationStats, Recorder, recording
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError
from svdq_jax.tree import named_leaves

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"
MAX_SAMPLES = 256  # rows kept per layer, as `svdq_jax.calibrate`'s default
STATS_SEED = 0  # `svdq_jax.calibrate`'s default seed

BlockHook = Callable[[str, nnx.Module], None]
"""`hook(path, block)`: called right after a float block is read (path e.g.
"transformer_blocks/3"), in both passes; the tests use it to check that earlier blocks are gone."""


@dataclasses.dataclass
class _Run:
  """One calibration run (a batch of prompts), as `FluxPipeline.__call__` sets it up."""

  prompt_embeds: jax.Array
  pooled: jax.Array
  negative: tuple[jax.Array, jax.Array, jax.Array] | None
  guidance: jax.Array
  img_ids: jax.Array
  txt_ids: jax.Array
  schedule: schedulers.Schedule
  carry: tuple[jax.Array, Any]


def check_streamable(folder: PipelineFolder) -> None:
  """Raises InputError unless `folder` is a FluxPipeline whose transformer/ holds diffusers
  safetensors (what the stream reads block by block); reads only JSON and safetensors headers."""
  if folder.pipeline != "FluxPipeline":
    raise InputError(f"quantize_pipeline {str(folder.path)!r}: --stream handles FluxPipeline "
                     f"folders, got {folder.pipeline}")
  if folder.denoiser.checkpoint:
    raise InputError(f"quantize_pipeline {str(folder.path)!r}: --stream reads a diffusers "
                     "transformer (safetensors); this transformer/ is a svdq-jax checkpoint")


def _block_table(config: FluxConfig, kind: str, index: int) -> dict[str, mapping.KeyEntry]:
  """{checkpoint key: entry with our path inside the block} of one diffusers block."""
  keys = (flux_converter.double_block_keys(config) if kind == DOUBLE
          else flux_converter.single_block_keys(config))
  return {f"{kind}.{index}.{key}": entry for key, entry in keys.items()}


def _split_proj_out(arrays: dict[str, np.ndarray], dim: int) -> dict[str, np.ndarray]:
  """A single block's arrays with proj_out split as `convert.nunchaku_export.split_proj_out`."""
  kernel, bias = arrays.pop("proj_out/kernel"), arrays.pop("proj_out/bias")
  arrays["proj_out/kernel"], arrays["proj_out/bias"] = kernel[:dim], np.zeros_like(bias)
  arrays["proj_out_mlp/kernel"], arrays["proj_out_mlp/bias"] = kernel[dim:], bias
  return arrays


class BlockReader:
  """Reads one float block (or the parts outside the blocks) of a diffusers FLUX transformer
  from its safetensors (`convert.flux`'s key tables), built as our module with the parameter
  dtypes `FluxTransformer.from_pretrained(dtype=dtype)` gives; `hook` sees every block read.
  With `config.split_proj_out` single blocks come split as `split_proj_out` splits them."""

  def __init__(self, reader: CheckpointReader, config: FluxConfig, dtype: jnp.dtype | None,
               hook: BlockHook | None = None):
    self.reader, self.config, self.dtype, self.hook = reader, config, dtype, hook
    self.name = str(reader.path)

  def check_keys(self) -> None:
    """Raises CheckpointError unless the file holds exactly the config's transformer keys."""
    mapping.check_key_sets(flux_converter.key_table(dataclasses.replace(
        self.config, split_proj_out=False)), self.reader.keys(), name=self.name,
        what="not a FluxTransformer2DModel checkpoint for this config")

  def outer(self) -> FluxTransformer:
    """The transformer without blocks: embedders, final norm and projection."""
    config = dataclasses.replace(self.config, num_layers=0, num_single_layers=0)
    table = flux_converter.key_table(dataclasses.replace(config, split_proj_out=False))
    model = registry.find_entry("flux").abstract_model(config, dtype=self.dtype)
    arrays = mapping.read_tensors(self.reader, table, name=self.name)
    return load_into(model, arrays, source=self.name, dtype=self.dtype, consume=True)

  def block(self, kind: str, index: int) -> nnx.Module:
    """Block `index` of `kind` (DOUBLE or SINGLE), float, in the computation dtype."""
    config = self.config
    arrays = mapping.read_tensors(self.reader, _block_table(
        dataclasses.replace(config, split_proj_out=False), kind, index), name=self.name)
    if kind == SINGLE and config.split_proj_out:
      arrays = _split_proj_out(arrays, config.inner_dim)
    cls = FluxTransformerBlock if kind == DOUBLE else FluxSingleTransformerBlock
    block = nnx.eval_shape(lambda: cls(config, dtype=self.dtype, rngs=nnx.Rngs(0)))
    block = load_into(block, arrays, source=f"{self.name} ({kind}.{index})", dtype=self.dtype,
                      consume=True)
    if self.hook is not None:
      self.hook(f"{kind}/{index}", block)
    return block

  def blocks(self) -> list[tuple[str, int]]:
    return ([(DOUBLE, i) for i in range(self.config.num_layers)]
            + [(SINGLE, i) for i in range(self.config.num_single_layers)])


def _release() -> None:
  """Frees what was just dropped (nnx modules hold reference cycles, so without a collection a
  released block's arrays could outlive the next block's read)."""
  gc.collect()


def _encode(folder: PipelineFolder, batches: list[list[str]], negatives: list[list[str]] | None,
            *, dtype: jnp.dtype | None, max_sequence_length: int
            ) -> list[tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]]:
  """(T5 features, CLIP pooled, negative pair or None) per batch, as
  `FluxPipeline.encode_prompt`; the encoders are loaded here and released on return."""
  path = folder.path
  clip = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype)
  t5 = T5Encoder.from_pretrained(path / "text_encoder_2", dtype=dtype)
  holder = FluxPipeline.__new__(FluxPipeline)  # only what encode_prompt reads
  holder.tokenizer = Tokenizer.from_pretrained(path / "tokenizer")
  holder.tokenizer_2 = Tokenizer.from_pretrained(path / "tokenizer_2")
  holder._clip, holder._t5 = jit_module(clip), jit_module(t5)
  out = []
  for i, batch in enumerate(batches):
    embeds, pooled = holder.encode_prompt(batch, max_sequence_length=max_sequence_length)
    negative = None if negatives is None else holder.encode_prompt(
        negatives[i], max_sequence_length=max_sequence_length)
    out.append((embeds, pooled, negative))
  del holder, clip, t5
  _release()
  return out


def _setup_runs(folder: PipelineFolder, config: FluxConfig, encoded: list, *, steps: int,
                height: int, width: int, seed: int, guidance_scale: float | None,
                true_cfg_scale: float) -> list[_Run]:
  """The runs' initial state, as `FluxPipeline.__call__` builds it for output_type="latent"."""
  scheduler = folder.scheduler
  f = folder.vae.config.downsample_factor * 2
  h, w = 2 * (height // f), 2 * (width // f)
  channels = config.in_channels // 4
  runs = []
  for prompt_embeds, pooled, negative in encoded:
    batch = prompt_embeds.shape[0]
    prompt_embeds = jnp.repeat(prompt_embeds, 1, axis=0)
    pooled = jnp.repeat(pooled, 1, axis=0)
    latents = pack_latents(jax.random.normal(jax.random.key(seed or 0),
                                             (batch, channels, h, w), jnp.float32))
    latents = jnp.asarray(latents).astype(prompt_embeds.dtype)
    schedule = scheduler.schedule(steps, image_seq_len=latents.shape[1])
    guidance = jnp.full((batch,), 3.5 if guidance_scale is None else guidance_scale, jnp.float32)
    if negative is not None:
      negative = (jnp.repeat(negative[0], 1, axis=0), jnp.repeat(negative[1], 1, axis=0),
                  jnp.full((batch,), true_cfg_scale, jnp.float32))
    runs.append(_Run(prompt_embeds, pooled, negative, guidance, latent_image_ids(h, w),
                     jnp.zeros((prompt_embeds.shape[1], 3), jnp.float32), schedule,
                     (latents, scheduler.init_state(latents))))
  return runs


def _model_inputs(run: _Run, i: jax.Array, guidance_embeds: bool) -> dict[str, Any]:
  """The transformer's call arguments at step i (`pipelines.flux.flux_step_fn`)."""
  x = run.carry[0]
  inputs, prompt_embeds, pooled, guidance = x, run.prompt_embeds, run.pooled, run.guidance
  if run.negative is not None:
    negative_embeds, negative_pooled, _ = run.negative
    inputs = jnp.concatenate([x, x])
    prompt_embeds = jnp.concatenate([prompt_embeds, negative_embeds])
    pooled = jnp.concatenate([pooled, negative_pooled])
    guidance = jnp.concatenate([guidance, guidance])
  timestep = jnp.broadcast_to(run.schedule.timesteps[i], inputs.shape[:1]).astype(x.dtype)
  return dict(hidden_states=inputs, encoder_hidden_states=prompt_embeds,
              pooled_projections=pooled, timestep=timestep / 1000, img_ids=run.img_ids,
              txt_ids=run.txt_ids, guidance=guidance if guidance_embeds else None)


def _advance(run: _Run, i: jax.Array, velocity: jax.Array,
             scheduler: schedulers.FlowMatchEulerScheduler) -> None:
  """The scheduler step of `flux_step_fn` after the transformer (true CFG combined first)."""
  x, scheduler_state = run.carry
  if run.negative is not None:
    batch = x.shape[0]
    positive, negative_velocity = velocity[:batch], velocity[batch:]
    scale = run.negative[2].astype(velocity.dtype)[:, None, None]
    velocity = negative_velocity + scale * (positive - negative_velocity)
  run.carry = scheduler.step(run.schedule, scheduler_state, i, velocity, x)


def _trajectory(blocks: BlockReader, outer: FluxTransformer, runs: list[_Run], steps: int,
                scheduler: schedulers.FlowMatchEulerScheduler, progress: bool) -> list[list]:
  """Runs the float denoising loops in lockstep, one block in memory at a time; returns the
  inputs of block 0, cache[run][step] = [hidden, encoder_hidden, temb, rotary]."""
  guidance_embeds = bool(blocks.config.guidance_embeds)
  cache: list[list] = [[] for _ in runs]
  order = blocks.blocks()
  bar = tqdm(total=steps * len(order), desc="stream: trajectory", unit="block",
             disable=not progress, leave=False)
  for step in range(steps):
    i = jnp.int32(step)
    states = []
    for r, run in enumerate(runs):
      embedded = list(outer.embed(**_model_inputs(run, i, guidance_embeds)))
      cache[r].append(embedded)
      states.append(list(embedded))
    for kind, index in order:
      block = blocks.block(kind, index)
      for state in states:
        state[1], state[0] = block(*state)
      del block
      _release()
      bar.update()
    for run, (hidden, _, temb, _) in zip(runs, states, strict=True):
      _advance(run, i, outer.output(hidden, temb), scheduler)
      if not bool(jnp.all(jnp.isfinite(run.carry[0]))):
        raise NonFiniteError(f"the transformer made the latents NaN or inf at denoising step "
                             f"{step + 1} of {steps} (calibration run); nothing written")
  bar.close()
  return cache


def _to_host(value: Any) -> Any:
  """A quantized layer or array as host numpy copies (frees device memory, keeps no reference
  to the block's buffers)."""
  return jax.tree.map(lambda a: np.array(a), value)


def calibrate_quantize_block(block: nnx.Module, prefix: str, inputs: list[list],
                             config: QuantConfig,
                             devices: Sequence[jax.Device] | int | None = None) -> dict[str, Any]:
  """Runs `block` on each cached input [hidden, encoder_hidden, temb, rotary] (replaced in place
  by the block's outputs, the next block's inputs) while recording its linears' inputs, then
  quantizes it with those statistics, its linears spread over `devices` (`quantize_params`).

  Returns:
    {path: host numpy array or SVDQLinear of numpy arrays} of the block's parameters, paths
    under `prefix` ("transformer_blocks/3/attn/to_q/kernel"), as `quantize_params` of the whole
    model gives them.
  """
  paths_by_id = {id(leaf): f"{prefix}/{path}" for path, leaf in named_leaves(block)
                 if getattr(leaf, "ndim", 0) == 2}
  recorder = Recorder(paths_by_id, MAX_SAMPLES, STATS_SEED)
  with recording(recorder):
    for state in inputs:
      state[1], state[0] = block(*state)
  stats: dict[str, ActivationStats] = recorder.stats()
  params: dict = {}
  node = params
  *parents, last = prefix.split("/")
  for part in parents:
    node = node.setdefault(part, {})
  node[last] = _nested(block)
  quantized = svdq_jax.quantize_params(params, stats, config, progress=False, devices=devices)
  return {path: _to_host(leaf) for path, leaf in named_leaves(quantized)}


def _calibrate_and_quantize(blocks: BlockReader, cache: list[list], config: QuantConfig,
                            progress: bool, devices: list[jax.Device]) -> dict[str, Any]:
  """Pass 2: each block recorded on the cached float inputs, quantized, released; returns the
  flat quantized parameters of all blocks (host arrays, "transformer_blocks/0/...")."""
  out: dict[str, Any] = {}
  notice_filter = _KeepFirst()
  logger = logging.getLogger("svdq_jax")
  logger.addFilter(notice_filter)
  inputs = [state for run_cache in cache for state in run_cache]  # (run, step) order
  try:
    for kind, index in tqdm(blocks.blocks(), desc="stream: calibrate+quantize", unit="block",
                            disable=not progress, leave=False):
      block = blocks.block(kind, index)
      out.update(calibrate_quantize_block(block, f"{kind}/{index}", inputs, config, devices))
      del block
      _release()
  finally:
    logger.removeFilter(notice_filter)
  return out


class _KeepFirst(logging.Filter):
  """Lets the first "stay 16-bit" notice of `quantize_params` through (one per block would
  repeat it 57 times)."""

  def __init__(self):
    super().__init__()
    self.seen = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if "stay 16-bit" not in record.getMessage():
      return True
    self.seen += 1
    return self.seen == 1


def _nested(module: nnx.Module) -> dict:
  """A module's parameters as a nested dict of arrays ({"attn": {"to_q": {"kernel": ...}}})."""
  tree: dict = {}
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    node = tree
    *parents, leaf = path_str(path).split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = variable.get_value()
  return tree


def quantize_flux_streamed(folder: PipelineFolder, out: Path, config: QuantConfig,
                           prompts: Sequence[str], *, num_inference_steps: int, height: int,
                           width: int, seed: int, guidance_scale: float | None,
                           dtype: jnp.dtype | None, nunchaku_layout: bool, batch_size: int = 1,
                           progress: bool = True, block_hook: BlockHook | None = None,
                           negative_prompt: str | None = None, true_cfg_scale: float = 1.0,
                           max_sequence_length: int = 512,
                           devices: Sequence[jax.Device] | int | None = None) -> FluxConfig:
  """Writes `folder`'s transformer, calibrated and quantized one block at a time, as our
  checkpoint in `out/transformer` (see the module docstring for the order); returns its config.

  The arguments are `quantize_pipeline`'s (settings already resolved); `batch_size` prompts per
  run as `calibrate_denoiser`; negative_prompt / true_cfg_scale / max_sequence_length as the
  pipeline call (the folder's sample_defaults). `block_hook` sees every float block read. Each
  block's linears are quantized over `devices` (`svdq_jax.quantize_params`; None: every local
  device) while the calibration forwards run on the default device.

  Raises:
    InputError (CheckpointError) for a transformer file that does not fit its config, a config
    that would quantize a layer outside the blocks (the presets keep them 16-bit), or `devices`
    that `svdq_jax.quantize_devices` refuses;
    NonFiniteError when the float trajectory turns NaN or inf.
  """
  check_streamable(folder)
  devices = svdq_jax.quantize_devices(devices)
  model_config = folder.denoiser.config
  if nunchaku_layout:
    model_config = dataclasses.replace(model_config, split_proj_out=True)
  prompts = FluxPipeline.check_call(
      "quantize_pipeline", list(prompts), negative_prompt, height=height, width=width,
      size_multiple=folder.size_multiple)
  batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
  negatives = None
  if negative_prompt is not None and true_cfg_scale > 1:
    negatives = [[negative_prompt] * len(batch) for batch in batches]
  encoded = _encode(folder, batches, negatives, dtype=dtype,
                    max_sequence_length=max_sequence_length)
  runs = _setup_runs(folder, model_config, encoded, steps=num_inference_steps, height=height,
                     width=width, seed=seed, guidance_scale=guidance_scale,
                     true_cfg_scale=true_cfg_scale)
  del encoded
  with CheckpointReader(folder.path / folder.denoiser_name) as reader:
    blocks = BlockReader(reader, model_config, dtype, block_hook)
    blocks.check_keys()
    outer = blocks.outer()
    outer_params = nnx.state(outer, nnx.Param)
    outside = svdq_jax.selected_kernels(outer_params, config)
    if outside and config.weight_format is not None:
      raise InputError(f"quantize_pipeline: --stream keeps the layers outside the transformer "
                       f"blocks 16-bit, but the config selects {sorted(outside)}")
    outer_params = svdq_jax.quantize_params(outer_params, None, config, progress=False)
    cache = _trajectory(blocks, outer, runs, num_inference_steps, folder.scheduler, progress)
    del runs
    arrays = {path_str(path): _to_host(variable.get_value())
              for path, variable in nnx.to_flat_state(outer_params)}
    del outer, outer_params
    arrays.update(_calibrate_and_quantize(blocks, cache, config, progress, devices))
    del cache
  transformer = out / folder.denoiser_name
  transformer.mkdir()
  write_into(transformer, arrays, model_type=folder.denoiser.entry.name, config=model_config)
  return model_config


def quantize_pipeline_streamed(folder: PipelineFolder, dst: str | Path, *, config: QuantConfig,
                               preset: str, prompts: Sequence[str], num_inference_steps: int,
                               height: int, width: int, seed: int,
                               guidance_scale: float | None, overwrite: bool,
                               dtype: jnp.dtype | None, nunchaku_layout: bool, progress: bool,
                               sampling: dict[str, Any], block_hook: BlockHook | None = None,
                               devices: Sequence[jax.Device] | int | None = None) -> Path:
  """`quantize_pipeline(..., stream=True)` once its arguments are checked: the same folder
  (other components copied, transformer/ as our checkpoint, svdq_quantization.json with
  "stream": true), written atomically."""
  check_streamable(folder)
  devices = svdq_jax.quantize_devices(devices)
  with atomic_folder(dst, overwrite=overwrite) as out:
    quantize_flux_streamed(folder, out, config, prompts, num_inference_steps=num_inference_steps,
                           height=height, width=width, seed=seed, guidance_scale=guidance_scale,
                           dtype=dtype, nunchaku_layout=nunchaku_layout, progress=progress,
                           block_hook=block_hook, devices=devices, **sampling)
    write_folder_rest(folder, out, preset=preset, config=config,
                      nunchaku_layout=nunchaku_layout, stream=True, calibration={
        "prompts": len(prompts), "num_inference_steps": num_inference_steps, "height": height,
        "width": width, "seed": seed, "guidance_scale": guidance_scale})
  return Path(dst)


def write_folder_rest(folder: PipelineFolder, out: Path, *, preset: str, config: QuantConfig,
                      nunchaku_layout: bool, stream: bool, calibration: dict[str, Any]) -> None:
  """The quantized folder `out` apart from its denoiser: `folder`'s other components copied
  unchanged and svdq_quantization.json (preset, layout, config, calibration settings, and
  "stream": true for a streamed run)."""
  for entry in folder.path.iterdir():
    if entry.name == folder.denoiser_name:
      continue
    copy = shutil.copytree if entry.is_dir() else shutil.copy2
    copy(entry, out / entry.name)
  note = {"preset": preset, "nunchaku_layout": nunchaku_layout, **({"stream": True} if stream
          else {}), "quant_config": config.to_dict(), "calibration": calibration}
  (out / "svdq_quantization.json").write_text(json.dumps(note, indent=2) + "\n")

