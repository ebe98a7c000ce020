"""The argument parser of `svdq-jax`, without the library: `svdq-jax --help`, a command's --help
and a bad flag answer without loading jax or the models (`cli.main` loads `cli.commands` only to
run a parsed command).

The few library values the help texts name are repeated here; tests/cli/test_main.py checks that
they match the library's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from svdq_jax.errors import InputError

DEFAULT_CALIB = Path(__file__).parent / "data" / "calib_prompts.txt"
BENCH_SCRIPTS = {"kernels": "kernels.py", "models": "sampling.py", "memory": "memory.py"}
DTYPES = ("auto", "float32", "bfloat16")
COMMANDS = ("demo", "convert", "import-nunchaku", "export-nunchaku", "quantize", "sample",
            "train-lora", "bench")
WEIGHT_SHARDINGS = ("fsdp", "channels")  # models.sharding.WEIGHT_SHARDINGS
DEMO_NUM_PROMPTS = 16  # demo.quality.NUM_PROMPTS
DEMO_STEPS = 20  # demo.sampling.NUM_STEPS


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump) and exit status 2."""

  def error(self, message: str):
    raise InputError(message)


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


def _size(text: str) -> tuple[int, int]:
  """--resolution: "S" (square) or "HxW"."""
  try:
    parts = [int(p) for p in text.lower().split("x")]
  except ValueError:
    parts = []
  if len(parts) not in (1, 2) or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"--resolution must be S or HxW (positive), got {text!r}")
  return (parts[0], parts[-1])


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of `svdq-jax` with its subcommands (`COMMANDS`)."""
  parser = _Parser(prog="svdq-jax", description="SVDQuant for JAX: convert, quantize and sample "
                   "diffusion models with 4-bit weights and activations.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  demo = sub.add_parser("demo", help="quantize the shipped demo model with every preset and "
                        "compare the images (grid.png, results.json, a table)")
  demo.add_argument("--model", default=None,
                    help="FluxPipeline folder of the demo model (default: the packaged "
                    "demo/emoji_flux)")
  demo.add_argument("--classifier", default=None,
                    help="emoji classifier folder of the metrics (default: the packaged "
                    "demo/emoji_classifier)")
  demo.add_argument("--out", default="demo_out",
                    help="output folder, replaced only when the run succeeds (default: demo_out)")
  demo.add_argument("--presets", default=None,
                    help="comma-separated QuantConfig presets (default: all)")
  demo.add_argument("--prompts", default=None,
                    help=f"prompt file, one per line (default: the first {DEMO_NUM_PROMPTS} "
                    "evaluation prompts of demo.data)")
  demo.add_argument("--steps", type=_positive("--steps"), default=None,
                    help=f"denoising steps (default: {DEMO_STEPS})")
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--quiet", action="store_true", help="no progress bars")

  conv = sub.add_parser("convert", help="diffusers/transformers folder or file -> svdq-jax "
                        "checkpoint")
  conv.add_argument("src", help="diffusers/transformers component folder or .safetensors file")
  conv.add_argument("dst", help="output folder (written atomically)")
  conv.add_argument("--model", default=None, help="model type (flux, pixart, unet, vae, t5, clip); "
                    "default: read from the source's config.json")

  nunchaku = sub.add_parser("import-nunchaku", help="Nunchaku INT4/NVFP4 FLUX.1 or SDXL "
                            "checkpoint -> svdq-jax checkpoint (exact, no re-quantization)")
  nunchaku.add_argument("src", help="Nunchaku .safetensors file or legacy folder")
  nunchaku.add_argument("dst", help="output folder (written atomically)")
  nunchaku.add_argument("--base", default=None,
                        help="diffusers FluxPipeline (FLUX.1) or StableDiffusionXLPipeline (SDXL) "
                        "folder: write a whole pipeline folder whose other components are "
                        "copied from it (loadable by `svdq-jax sample`)")
  nunchaku.add_argument("--overwrite", action="store_true", help="replace an existing DST")

  export = sub.add_parser("export-nunchaku", help="svdq-jax quantized FLUX.1 checkpoint (quantized "
                          "with --nunchaku-layout) -> Nunchaku single .safetensors file")
  export.add_argument("src", help="our quantized pipeline folder or its transformer folder")
  export.add_argument("dst", help="output .safetensors file (written atomically)")
  export.add_argument("--overwrite", action="store_true", help="replace an existing DST")

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
  sample.add_argument("--shard-weights", choices=WEIGHT_SHARDINGS, default=None,
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

  bench = sub.add_parser("bench", help="run a benchmark script and print its table")
  bench.add_argument("suite", nargs="?", default="models", choices=sorted(BENCH_SCRIPTS),
                     help="kernels, models (sampling) or memory (default: models)")
  bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for the script")
  return parser
