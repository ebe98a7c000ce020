"""The subcommands of `svdq-jax` (`COMMAND_RUNS`): each takes the parsed arguments
(`cli.parser.build_parser`) and returns the exit status. This module loads jax, the models and the
pipelines; `cli.main` imports it only after the arguments parsed.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pipelines
from cli.main import read_prompt_file
from cli.parser import BENCH_SCRIPTS
from convert import api
from convert.lora import parse_lora_spec
from convert.nunchaku_checkpoint import import_nunchaku
from convert.nunchaku_export import export_nunchaku
from demo import quality, sampling
from models import sharding
from pipelines import captions, distributed, train_lora
from pipelines.folder import PipelineFolder
from svdq_jax.config import QuantConfig
from svdq_jax.errors import InputError

NonFiniteError = pipelines.NonFiniteError


def _dtype(name: str):
  """The models' dtype: "auto" is bfloat16 on a GPU and float32 elsewhere."""
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  return jnp.dtype(name)


def _preset_list(text: str) -> tuple[str, ...]:
  return tuple(name.strip() for name in text.split(",") if name.strip())


def _cmd_demo(args: argparse.Namespace) -> int:
  """Quantizes the demo model with every preset, writes OUT/grid.png and OUT/results.json, prints
  the table (`demo.quality`); every input is checked before a model is loaded."""
  presets = quality.check_presets(quality.ALL_PRESETS if args.presets is None
                                  else _preset_list(args.presets))
  prompts = read_prompt_file(args.prompts) if args.prompts else list(quality.DEFAULT_PROMPTS)
  model = quality.DEFAULT_MODEL if args.model is None else args.model
  quality.check_model(model)
  judge = quality.Judge.load(quality.DEFAULT_CLASSIFIER if args.classifier is None
                             else args.classifier)
  report = quality.measure(model, judge, presets=presets, prompts=prompts, seed=args.seed,
                           num_steps=args.steps or sampling.NUM_STEPS, progress=not args.quiet)
  quality.write_report(report, args.out)
  print(quality.format_table(report.results))
  print(f"wrote {args.out}/grid.png and {args.out}/results.json", file=sys.stderr)
  return 0


def _cmd_convert(args: argparse.Namespace) -> int:
  src = Path(args.src)
  if not src.exists():
    raise InputError(f"source {args.src!r} does not exist")
  api.convert(src, Path(args.dst), model=args.model)
  print(f"wrote {args.dst}", file=sys.stderr)
  return 0


def _cmd_import_nunchaku(args: argparse.Namespace) -> int:
  import_nunchaku(args.src, args.dst, base=args.base, overwrite=args.overwrite)
  print(f"wrote {args.dst}", file=sys.stderr)
  return 0


def _cmd_export_nunchaku(args: argparse.Namespace) -> int:
  export_nunchaku(args.src, args.dst, overwrite=args.overwrite)
  print(f"wrote {args.dst}", file=sys.stderr)
  return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
  prompts = read_prompt_file(args.calib)
  pipelines.quantize_pipeline(args.src, args.dst, preset=args.preset, prompts=prompts,
                              num_inference_steps=args.steps, height=args.height,
                              width=args.width, seed=args.seed, guidance_scale=args.guidance,
                              overwrite=args.overwrite, dtype=_dtype(args.dtype),
                              nunchaku_layout=args.nunchaku_layout, stream=args.stream,
                              devices=args.devices)
  print(f"wrote {args.dst}", file=sys.stderr)
  return 0


SAMPLE_BUILTIN_DEFAULTS = {"num_inference_steps": 28, "height": 1024, "width": 1024}
"""Sampling settings when neither a flag nor the folder's sample_defaults.json gives one."""


def _sample_settings(args: argparse.Namespace, folder: PipelineFolder) -> dict:
  """The call arguments of `sample`: flags > the folder's sample_defaults.json > built-ins."""
  flags = {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
           "guidance_scale": args.guidance, "true_cfg_scale": args.true_cfg,
           "negative_prompt": args.negative_prompt}
  return {**SAMPLE_BUILTIN_DEFAULTS, **folder.sample_defaults,
          **{k: v for k, v in flags.items() if v is not None}}


def _cmd_sample(args: argparse.Namespace) -> int:
  """Samples and writes the PNGs. With several processes (`pipelines.distributed`) every process
  runs this with the same arguments, and each writes the PNGs of the rows its devices computed
  (`models.sharding.process_rows`): every image once, no image crossing processes."""
  if distributed.requested(args.coordinator, args.num_processes, args.process_id):
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  loras = [parse_lora_spec(spec) for spec in args.lora]
  out = pipelines.check_png_path(args.out)
  count = sharding.sampling_device_count(args.devices)
  folder = PipelineFolder.read(args.model)
  settings = _sample_settings(args, folder)
  if loras:
    settings["loras"] = loras
  if args.shard_weights is not None:
    settings["shard_weights"] = args.shard_weights
  pipeline = pipelines.PIPELINES[folder.pipeline]
  accepted = inspect.signature(pipeline.__call__).parameters
  several = jax.process_count() > 1
  if several and "gather" not in accepted:
    raise InputError(f"{folder.pipeline} in {str(folder.path)!r} does not sample over several "
                     "processes (FluxPipeline does)")
  for name in settings:
    if name not in accepted:
      raise InputError(f"{folder.pipeline} in {str(folder.path)!r} has no {name} setting "
                       "(from a flag or its sample_defaults.json)")
  prompts = pipeline.check_call(f"{folder.pipeline} in {str(folder.path)!r}", args.prompt,
                                settings.get("negative_prompt"), height=settings["height"],
                                width=settings["width"], size_multiple=folder.size_multiple,
                                num_images_per_prompt=args.num_images)
  sharded = ({} if args.shard_weights is None
             else {"shard_weights": args.shard_weights, "devices": count})
  pipe = pipelines.load_pipeline(folder, dtype=_dtype(args.dtype), **sharded)
  progress = not args.quiet and args.shard_weights is None
  images = pipe(prompts, seed=args.seed, num_images_per_prompt=args.num_images, devices=count,
                progress=progress, **settings, **({"gather": False} if several else {}))
  per_image_prompts = [p for p in prompts for _ in range(args.num_images)]
  rows = (sharding.process_rows(len(per_image_prompts), sharding.data_mesh(count)) if several
          else list(range(len(per_image_prompts))))
  extra = {"model": str(folder.path), "steps": str(settings["num_inference_steps"])}
  if loras:
    extra["loras"] = " ".join(f"{path}:{strength:g}" for path, strength in loras)
  paths = pipelines.save_images(images, out, prompts=[per_image_prompts[r] for r in rows],
                                seed=args.seed, extra=extra, indices=rows,
                                batch_size=len(per_image_prompts))
  for path in paths:
    print(path)
  return 0


def _mib(value: int | None) -> str:
  return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _cmd_train_lora(args: argparse.Namespace) -> int:
  examples = captions.read_examples(args.data)
  folder = PipelineFolder.read(args.model)
  if folder.pipeline != "FluxPipeline":
    raise InputError(f"train-lora: {str(folder.path)!r} is a {folder.pipeline}; LoRA training "
                     "supports FluxPipeline models")
  height, width = args.resolution
  pipelines.check_image_size(f"train-lora {str(folder.path)!r}", height, width,
                             folder.size_multiple)
  config = train_lora.LoRATrainConfig(
      rank=args.rank, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
      learning_rate=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
      max_sequence_length=args.max_sequence_length, guidance_scale=args.guidance,
      **({"targets": tuple(args.target)} if args.target else {}))
  quant_config = None if args.quantize is None else QuantConfig.preset(args.quantize)
  images = np.stack([captions.load_image(e.image, height, width) for e in examples])
  texts = [e.caption for e in examples]
  pipe = pipelines.load_pipeline(folder, dtype=_dtype(args.dtype))
  if quant_config is not None:
    pipelines.quantize_denoiser(pipe, quant_config, texts, num_inference_steps=4,
                                height=height, width=width, progress=not args.quiet)
  result = train_lora.train_lora(pipe, images, texts, args.out, config, progress=not args.quiet)
  record = result.record
  memory = record["step_memory"]
  print(f"wrote {result.lora_file} ({len(examples)} images, {record['steps']} steps, final loss "
        f"{record['final_loss']:.4f}); loss curve {Path(args.out) / 'loss.png'}", file=sys.stderr)
  print(f"memory: peak resident {_mib(record['peak_rss_bytes'])}, device peak "
        f"{_mib(record['device_peak_bytes'])}, training step (XLA) "
        f"{_mib(memory.get('argument_bytes'))} arguments + {_mib(memory.get('temp_bytes'))} "
        f"temporaries; transformer {_mib(record['base_parameter_bytes'])}", file=sys.stderr)
  print(result.lora_file)
  return 0


def _cmd_bench(args: argparse.Namespace) -> int:
  """Runs a benchmark script of the source checkout as a program (benchmarks/ sits above every
  package, so it is run, never imported)."""
  script = Path(__file__).resolve().parents[1] / "benchmarks" / BENCH_SCRIPTS[args.suite]
  if not script.is_file():
    raise InputError(f"benchmark script {script} is not there (benchmarks/ ships with the source "
                     "checkout, not with an installed wheel)")
  return subprocess.call([sys.executable, str(script), *args.extra])


COMMAND_RUNS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _cmd_demo, "convert": _cmd_convert, "import-nunchaku": _cmd_import_nunchaku,
    "export-nunchaku": _cmd_export_nunchaku, "quantize": _cmd_quantize, "sample": _cmd_sample,
    "train-lora": _cmd_train_lora, "bench": _cmd_bench}
"""The function of each command of `cli.parser.COMMANDS`."""
