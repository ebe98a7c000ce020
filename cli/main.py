"""The `svdq-jax` command line: demo, convert, import-nunchaku, export-nunchaku, quantize, sample,
train-lora, bench.

Every subcommand hands its input to the library, which checks it before doing any work; bad input
(a missing folder, a wrong model type, a bad prompt file, more devices than exist, an unknown
preset, an image size the model cannot make) prints one line `svdq-jax <command>: error: <what>`
on stderr and exits with status 2. Bad input is an `InputError` (`convert.CheckpointError`
included: a missing, corrupt or mismatched checkpoint file) or an OS error about a path the user
named; any other exception is a bug and keeps its traceback (exit status 1). A sampling run whose
latents or pixels turn NaN or inf (`pipelines.NonFiniteError`) prints one line naming the step
and component, writes no image and exits with status 3.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pipelines
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

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
DEFAULT_CALIB = Path(__file__).parent / "data" / "calib_prompts.txt"
BENCH_SCRIPTS = {"kernels": "kernels.py", "models": "sampling.py", "memory": "memory.py"}
DTYPES = ("auto", "float32", "bfloat16")
COMMANDS = ("demo", "convert", "import-nunchaku", "export-nunchaku", "quantize", "sample",
            "train-lora", "bench")
# OS errors about a path the user named; other OS errors (a full disk, an I/O error) are not input.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump) and exit status 2."""

  def error(self, message: str):
    raise InputError(message)


def read_prompt_file(path: str | os.PathLike) -> list[str]:
  """Non-empty, stripped lines of a UTF-8 text file; lines starting with '#' are comments.

  Raises:
    InputError when the file is missing, not a file, not UTF-8 text, or holds no prompt.
  """
  file = Path(path)
  if not file.exists():
    raise InputError(f"prompt file {str(file)!r} does not exist")
  if not file.is_file():
    raise InputError(f"prompt file {str(file)!r} is not a file")
  try:
    text = file.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"prompt file {str(file)!r} is not UTF-8 text ({e.reason} at byte "
                     f"{e.start})") from e
  if "\x00" in text:
    raise InputError(f"prompt file {str(file)!r} is not a text file (it contains NUL bytes)")
  prompts = [line.strip() for line in text.splitlines()]
  prompts = [p for p in prompts if p and not p.startswith("#")]
  if not prompts:
    raise InputError(f"prompt file {str(file)!r} holds no prompt (one prompt per line expected)")
  return prompts


def _positive(name: str):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
      raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
    return value
  return parse


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
  presets = quality.check_presets(_preset_list(args.presets))
  prompts = read_prompt_file(args.prompts) if args.prompts else list(quality.DEFAULT_PROMPTS)
  quality.check_model(args.model)
  judge = quality.Judge.load(args.classifier)
  report = quality.measure(args.model, judge, presets=presets, prompts=prompts, seed=args.seed,
                           num_steps=args.steps, progress=not args.quiet)
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
  pipe = pipelines.load_pipeline(folder, dtype=_dtype(args.dtype))
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


def _size(text: str) -> tuple[int, int]:
  """--resolution: "S" (square) or "HxW"."""
  try:
    parts = [int(p) for p in text.lower().split("x")]
  except ValueError:
    parts = []
  if len(parts) not in (1, 2) or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"--resolution must be S or HxW (positive), got {text!r}")
  return (parts[0], parts[-1])


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


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of `svdq-jax` with its subcommands (`COMMANDS`)."""
  parser = _Parser(prog="svdq-jax", description="SVDQuant for JAX: convert, quantize and sample "
                   "diffusion models with 4-bit weights and activations.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  demo = sub.add_parser("demo", help="quantize the shipped demo model with every preset and "
                        "compare the images (grid.png, results.json, a table)")
  demo.add_argument("--model", default=str(quality.DEFAULT_MODEL),
                    help="FluxPipeline folder of the demo model (default: the packaged "
                    "demo/emoji_flux)")
  demo.add_argument("--classifier", default=str(quality.DEFAULT_CLASSIFIER),
                    help="emoji classifier folder of the metrics (default: the packaged "
                    "demo/emoji_classifier)")
  demo.add_argument("--out", default="demo_out",
                    help="output folder, replaced only when the run succeeds (default: demo_out)")
  demo.add_argument("--presets", default=",".join(quality.ALL_PRESETS),
                    help="comma-separated QuantConfig presets (default: all)")
  demo.add_argument("--prompts", default=None,
                    help=f"prompt file, one per line (default: the first {quality.NUM_PROMPTS} "
                    "evaluation prompts of demo.data)")
  demo.add_argument("--steps", type=_positive("--steps"), default=sampling.NUM_STEPS,
                    help=f"denoising steps (default: {sampling.NUM_STEPS})")
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--quiet", action="store_true", help="no progress bars")
  demo.set_defaults(run=_cmd_demo)

  conv = sub.add_parser("convert", help="diffusers/transformers folder or file -> svdq-jax "
                        "checkpoint")
  conv.add_argument("src", help="diffusers/transformers component folder or .safetensors file")
  conv.add_argument("dst", help="output folder (written atomically)")
  conv.add_argument("--model", default=None, help="model type (flux, pixart, unet, vae, t5, clip); "
                    "default: read from the source's config.json")
  conv.set_defaults(run=_cmd_convert)

  nunchaku = sub.add_parser("import-nunchaku", help="Nunchaku INT4/NVFP4 FLUX.1 or SDXL "
                            "checkpoint -> svdq-jax checkpoint (exact, no re-quantization)")
  nunchaku.add_argument("src", help="Nunchaku .safetensors file or legacy folder")
  nunchaku.add_argument("dst", help="output folder (written atomically)")
  nunchaku.add_argument("--base", default=None,
                        help="diffusers FluxPipeline (FLUX.1) or StableDiffusionXLPipeline (SDXL) "
                        "folder: write a whole pipeline folder whose other components are "
                        "copied from it (loadable by `svdq-jax sample`)")
  nunchaku.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  nunchaku.set_defaults(run=_cmd_import_nunchaku)

  export = sub.add_parser("export-nunchaku", help="svdq-jax quantized FLUX.1 checkpoint (quantized "
                          "with --nunchaku-layout) -> Nunchaku single .safetensors file")
  export.add_argument("src", help="our quantized pipeline folder or its transformer folder")
  export.add_argument("dst", help="output .safetensors file (written atomically)")
  export.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  export.set_defaults(run=_cmd_export_nunchaku)

  quant = sub.add_parser("quantize", help="calibrate on prompts and write a quantized pipeline")
  quant.add_argument("src", help="diffusers pipeline folder (with model_index.json)")
  quant.add_argument("dst", help="output folder, loadable by `svdq-jax sample`")
  quant.add_argument("--preset", default="svdquant-int4",
                     help="QuantConfig preset (default: svdquant-int4)")
  quant.add_argument("--calib", default=str(DEFAULT_CALIB),
                     help="calibration prompts, one per line (default: the shipped file)")
  quant.add_argument("--steps", type=_positive("--steps"), default=4,
                     help="denoising steps per calibration prompt (default: 4)")
  quant.add_argument("--height", type=_positive("--height"), default=None,
                     help="calibration height (default: the folder's sample_defaults.json, else "
                     "512)")
  quant.add_argument("--width", type=_positive("--width"), default=None,
                     help="calibration width (default: the folder's sample_defaults.json, else "
                     "512)")
  quant.add_argument("--seed", type=int, default=0)
  quant.add_argument("--guidance", type=float, default=None,
                     help="guidance scale of the calibration runs (default: the pipeline's own; "
                     "0 for SDXL-Turbo)")
  quant.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  quant.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="models' dtype while calibrating (auto: bfloat16 on GPU, else float32)")
  quant.add_argument("--nunchaku-layout", action="store_true",
                     help="FLUX: split proj_out and quantize q/k/v as one layer, as Nunchaku's "
                     "files need (for export-nunchaku)")
  quant.add_argument("--stream", action="store_true",
                     help="FLUX: hold one transformer block at a time (read from the "
                     "safetensors, calibrated, quantized, released), for models larger than memory")
  quant.add_argument("--devices", type=_positive("--devices"), default=None,
                     help="quantize the layers on the first N local devices, spread over them "
                     "(default: all; one on the CPU backend; the result is the same on any number)")
  quant.set_defaults(run=_cmd_quantize)

  sample = sub.add_parser("sample", help="text-to-image from a diffusers or svdq-jax folder")
  sample.add_argument("model", help="pipeline folder (diffusers layout or svdq-jax quantized)")
  sample.add_argument("--prompt", action="append", required=True,
                      help="text prompt; repeat for a batch of prompts")
  sample.add_argument("--negative-prompt", default=None,
                      help="negative prompt (classifier-free guidance models; FLUX.1: with "
                      "--true-cfg)")
  sample.add_argument("--steps", type=_positive("--steps"), default=None,
                      help="denoising steps (default: the folder's sample_defaults.json, else 28)")
  sample.add_argument("--seed", type=int, default=0)
  sample.add_argument("--out", type=Path, default=Path("out.png"),
                      help="PNG path; several images get _<index> before .png")
  sample.add_argument("--height", type=_positive("--height"), default=None,
                      help="image height (default: the folder's sample_defaults.json, else 1024)")
  sample.add_argument("--width", type=_positive("--width"), default=None,
                      help="image width (default: the folder's sample_defaults.json, else 1024)")
  sample.add_argument("--guidance", type=float, default=None,
                      help="guidance scale (default: the pipeline's own)")
  sample.add_argument("--true-cfg", type=float, default=None,
                      help="FLUX.1: true classifier-free guidance scale, used above 1 with "
                      "--negative-prompt (default: the folder's sample_defaults.json, else 1)")
  sample.add_argument("--num-images", type=_positive("--num-images"), default=1,
                      help="images per prompt")
  sample.add_argument("--devices", type=_positive("--devices"), default=None,
                      help="data-parallel devices (the batch is sharded over them; default 1, or "
                      "every device of every process in a multi-process run)")
  sample.add_argument("--shard-weights", choices=sharding.WEIGHT_SHARDINGS, default=None,
                      help="split the transformer's parameters over the --devices, FSDP-style "
                      "or by output channels, instead of a whole copy per device (no progress "
                      "bar)")
  sample.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="several processes: process 0's coordinator address (else "
                      "JAX_COORDINATOR_ADDRESS or a detected cluster); each process writes the "
                      "PNGs of its rows")
  sample.add_argument("--num-processes", type=_positive("--num-processes"), default=None,
                      help="several processes: how many (else JAX_NUM_PROCESSES or a detected "
                      "cluster)")
  sample.add_argument("--process-id", type=int, default=None,
                      help="several processes: this one's id, 0..N-1 (else JAX_PROCESS_ID or a "
                      "detected cluster)")
  sample.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="LoRA file (diffusers/PEFT, kohya or XLabs), strength 1 unless "
                      "given; repeat for several")
  sample.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="models' dtype (auto: bfloat16 on GPU, else float32)")
  sample.add_argument("--quiet", action="store_true", help="no progress bar")
  sample.set_defaults(run=_cmd_sample)

  train = sub.add_parser("train-lora", help="train a LoRA on a (4-bit) FLUX pipeline's "
                         "transformer")
  train.add_argument("model", help="FluxPipeline folder (svdq-jax quantized, or float)")
  train.add_argument("data", help="folder of images with captions.txt (<file><TAB><caption>) or "
                     "<image>.txt captions, or a JSON list of {\"image\", \"caption\"}")
  train.add_argument("out", help="run folder: the LoRA file, loss curve, memory record and "
                     "checkpoints (an interrupted run in it is resumed)")
  train.add_argument("--rank", type=_positive("--rank"), default=16)
  train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
  train.add_argument("--steps", type=_positive("--steps"), default=1000)
  train.add_argument("--batch-size", type=_positive("--batch-size"), default=1)
  train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
  train.add_argument("--seed", type=int, default=0)
  train.add_argument("--resolution", type=_size, default=(512, 512), metavar="S|HxW",
                     help="training image size (default 512)")
  train.add_argument("--max-sequence-length", type=_positive("--max-sequence-length"),
                     default=512, help="T5 tokens of the captions")
  train.add_argument("--guidance", type=float, default=3.5,
                     help="guidance input of a FLUX.1-dev-like model (default 3.5)")
  train.add_argument("--checkpoint-every", type=_positive("--checkpoint-every"), default=100)
  train.add_argument("--target", action="append", default=[], metavar="PATTERN",
                     help="kernel path pattern to train (fnmatch); repeat; default: every "
                     "attention and MLP linear of the blocks")
  train.add_argument("--quantize", default=None, metavar="PRESET",
                     help="quantize the transformer first with this preset, calibrated on the "
                     "captions (for a float MODEL)")
  train.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="models' dtype (auto: bfloat16 on GPU, else float32)")
  train.add_argument("--quiet", action="store_true", help="no progress bars")
  train.set_defaults(run=_cmd_train_lora)

  bench = sub.add_parser("bench", help="run a benchmark script and print its table")
  bench.add_argument("suite", nargs="?", default="models", choices=sorted(BENCH_SCRIPTS),
                     help="kernels, models (sampling) or memory (default: models)")
  bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for the script")
  bench.set_defaults(run=_cmd_bench)
  return parser


def _is_input_error(error: Exception) -> bool:
  """Whether `error` is about the user's input (see the module docstring), not a bug."""
  return isinstance(error, (InputError, *PATH_ERRORS))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `svdq-jax` with `argv` (default: sys.argv[1:]); returns the exit status.

  Bad input returns EXIT_BAD_INPUT after one line on stderr; any other exception propagates with
  its traceback (the console script then exits with status 1).
  """
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = f"svdq-jax {argv[0]}" if argv and argv[0] in COMMANDS else "svdq-jax"
  try:
    args = parser.parse_args(argv)
    return args.run(args)
  except Exception as e:
    if not (_is_input_error(e) or isinstance(e, pipelines.NonFiniteError)):
      raise
    print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_NON_FINITE if isinstance(e, pipelines.NonFiniteError) else EXIT_BAD_INPUT
