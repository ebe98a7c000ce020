"""Teaching the 4-bit demo model emoji it never saw: `python -m demo.lora_example --run DIR`
(or `--pipeline demo/emoji_flux --classifier demo/emoji_classifier --out OUT`).

The demo model (`demo.train`) holds out every 25th emoji of its subset (`demo.data.split_emoji`).
This script quantizes the trained pipeline (svdquant-int4, calibrated on the evaluation prompts),
trains a LoRA on the 4-bit transformer with the renders of `--emoji` held-out emoji and their
names (`pipelines.train_lora`), and measures with the demo classifier the prompt accuracy of the
4-bit model on those names before and after (and on the evaluation prompts, which it must keep).
For the memory comparison it trains the same LoRA on the float model as well; each training runs
in a fresh process, so that each one's peak resident memory is its own.

`--preserve N` adds N emoji of the training split (never an evaluation prompt) to the LoRA's
data, so that it keeps what the model knew.

Writes into OUT (default DIR/lora_example):
  data/                      the training renders and captions.txt (`svdq-jax train-lora` reads it)
  pipeline_int4/             the quantized pipeline
  lora_int4/, lora_float/    the two training runs (LoRA file, loss curve, train_lora.json)
  lora_example.png           renders, 4-bit before, 4-bit with the LoRA, float with its LoRA
  lora_example.json          accuracies and the memory of both trainings
  LORA_EXAMPLE.md            the same as a short report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from demo import classifier, data, sampling
from demo.flags import add_config_flags, config_from_flags
from demo.tokenizer import MAX_LENGTH
from demo.train import PIPELINE_DIR
from pipelines import captions, load_pipeline, plots, quantize_pipeline, train_lora

PRESET = "svdquant-int4"
RUNS = {"int4": "lora_int4", "float": "lora_float"}


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """Settings of the experiment (the defaults are the ones the README reports)."""

  emoji: int = 10
  steps: int = 400
  rank: int = 16
  learning_rate: float = 1e-3
  batch_size: int = 10
  samples: int = 4
  preserve: int = 0
  calib_prompts: int = len(data.EVAL_PROMPTS)
  calib_steps: int = 4
  seed: int = 0

  def train_config(self) -> train_lora.LoRATrainConfig:
    return train_lora.LoRATrainConfig(
        rank=self.rank, steps=self.steps, batch_size=self.batch_size,
        learning_rate=self.learning_rate, seed=self.seed,
        checkpoint_every=max(1, self.steps // 4), max_sequence_length=MAX_LENGTH)


def preserved_emoji(train: Sequence[data.Emoji], count: int) -> list[data.Emoji]:
  """`count` emoji the model was trained on, spread evenly over the training split and never an
  evaluation prompt: added to the LoRA's data so that it keeps what the model knew (DreamBooth's
  prior preservation, with the renders as the prior)."""
  candidates = [e for e in train if e.prompt not in data.EVAL_PROMPTS]
  if count <= 0:
    return []
  step = max(1, len(candidates) // count)
  return candidates[::step][:count]


def write_training_data(emoji: Sequence[data.Emoji], folder: Path) -> Path:
  """The renders of `emoji` as PNGs with captions.txt (`pipelines.captions`'s folder layout)."""
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for e, image in zip(emoji, data.render_all(emoji), strict=True):
    name = f"{e.codepoint:x}.png"
    Image.fromarray(image).save(folder / name)
    lines.append(f"{name}\t{e.prompt}\n")
  (folder / captions.CAPTIONS_FILE).write_text("".join(lines))
  return folder


def train_child(model: Path, data_dir: Path, out: Path, config: ExampleConfig) -> dict:
  """Trains the LoRA in a fresh Python process (its own peak memory); returns its record."""
  command = [sys.executable, "-m", "demo.lora_example", "--train-child", str(model),
             str(data_dir), str(out), "--config", json.dumps(dataclasses.asdict(config))]
  subprocess.run(command, check=True)
  return json.loads((out / train_lora.RECORD_FILE).read_text())


def _train_in_this_process(model: Path, data_dir: Path, out: Path, config: ExampleConfig) -> None:
  examples = captions.read_examples(data_dir)
  images = np.stack([captions.load_image(e.image, data.IMAGE_SIZE, data.IMAGE_SIZE)
                     for e in examples])
  pipe = load_pipeline(model)
  train_lora.train_lora(pipe, images, [e.caption for e in examples], out, config.train_config())


def _accuracy(pipe, model, labels, prompts: Sequence[str], samples: int,
              loras=None) -> tuple[float, np.ndarray]:
  """Prompt accuracy over `samples` images per prompt (seeds 0..samples-1); the first images."""
  images = [sampling.generate(pipe, prompts, seed=1000 * s, loras=loras) for s in range(samples)]
  score = float(np.mean([classifier.prompt_accuracy(model, labels, batch, prompts)
                         for batch in images]))
  return score, images[0]


def run(run_dir: Path | None, out: Path, config: ExampleConfig, *,
        pipeline: Path | None = None, classifier_dir: Path | None = None) -> dict:
  """The whole experiment (see the module docstring); returns the record it writes.

  The float pipeline and the classifier are `pipeline` and `classifier_dir`, by default
  run_dir/pipeline and run_dir/classifier (a `demo.train` run folder).
  """
  started = time.time()
  out.mkdir(parents=True, exist_ok=True)
  train, held_out = data.split_emoji(data.select_emoji())
  taught = held_out[:config.emoji]
  prompts = [e.prompt for e in taught]
  data_dir = write_training_data(taught + preserved_emoji(train, config.preserve), out / "data")
  float_dir = pipeline or run_dir / PIPELINE_DIR
  int4_dir = out / "pipeline_int4"
  if not int4_dir.exists():
    quantize_pipeline(float_dir, int4_dir, preset=PRESET,
                      prompts=list(data.EVAL_PROMPTS[:config.calib_prompts]),
                      num_inference_steps=config.calib_steps, height=data.IMAGE_SIZE,
                      width=data.IMAGE_SIZE, progress=False)
  records = {kind: train_child(model, data_dir, out / RUNS[kind], config)
             for kind, model in (("int4", int4_dir), ("float", float_dir))}

  model, labels = classifier.load_classifier(classifier_dir or run_dir / "classifier")
  int4 = load_pipeline(int4_dir)
  flt = load_pipeline(float_dir)
  lora_int4 = [(out / RUNS["int4"] / train_lora.LORA_FILE, 1.0)]
  lora_float = [(out / RUNS["float"] / train_lora.LORA_FILE, 1.0)]
  eval_prompts = list(data.EVAL_PROMPTS)
  results, grids = {}, {}
  for name, pipe, loras in (("int4_before", int4, None), ("int4_after", int4, lora_int4),
                            ("float_before", flt, None), ("float_after", flt, lora_float)):
    results[name], grids[name] = _accuracy(pipe, model, labels, prompts, config.samples, loras)
    results[f"{name}_eval_prompts"], _ = _accuracy(pipe, model, labels, eval_prompts, 1, loras)
  renders = data.render_all(taught).astype(np.float32) / 255
  rows = [renders, grids["int4_before"], grids["int4_after"], grids["float_after"]]
  titles = ["render", "int4", "int4+LoRA", "float+LoRA"]
  labels_grid = [f"{t}: {p}" for t in titles for p in prompts]
  plots.image_grid(np.concatenate(rows), labels_grid, columns=len(prompts)).save(
      out / "lora_example.png")
  record = {
      "config": dataclasses.asdict(config),
      "preset": PRESET,
      "emoji": prompts,
      "prompt_accuracy_held_out": {k: v for k, v in results.items() if "eval" not in k},
      "prompt_accuracy_eval_prompts": {k.removesuffix("_eval_prompts"): v
                                       for k, v in results.items() if "eval" in k},
      "memory": {kind: {key: rec[key] for key in ("peak_rss_bytes", "device_peak_bytes",
                                                  "step_memory", "base_parameter_bytes",
                                                  "lora_parameters", "seconds", "final_loss")}
                 for kind, rec in records.items()},
      "seconds": round(time.time() - started, 1),
  }
  (out / "lora_example.json").write_text(json.dumps(record, indent=2) + "\n")
  (out / "LORA_EXAMPLE.md").write_text(report(record))
  return record


def _mib(value: int | None) -> str:
  return "n/a" if value is None else f"{value / 2**20:.1f}"


def report(record: dict) -> str:
  """LORA_EXAMPLE.md: the experiment's numbers as a short Markdown report."""
  config, acc = record["config"], record["prompt_accuracy_held_out"]
  keep = record["prompt_accuracy_eval_prompts"]
  rows = []
  for kind in ("int4", "float"):
    mem = record["memory"][kind]
    step = mem["step_memory"]
    rows.append(f"| {kind} | {_mib(mem['base_parameter_bytes'])} | "
                f"{_mib(step.get('argument_bytes'))} | {_mib(step.get('temp_bytes'))} | "
                f"{_mib(mem['peak_rss_bytes'])} | {_mib(mem['device_peak_bytes'])} | "
                f"{mem['final_loss']:.4f} | {mem['seconds']:.0f} |")
  preserve = config.get("preserve", 0)
  preserved = (f" and of {preserve} emoji of its training set (to keep them)" if preserve
               else "")
  return f"""# LoRA on the 4-bit demo model: {len(record['emoji'])} held-out emoji

`python -m demo.lora_example` (svdq-jax): a rank-{config['rank']} LoRA, {config['steps']} AdamW
steps (lr {config['learning_rate']}, batch {config['batch_size']}), trained on the
{record['preset']} transformer with the renders of emoji the demo model never saw:
{', '.join(record['emoji'])}{preserved}.

Prompt accuracy (demo classifier, {config['samples']} images per name):

| model | held-out names | the 32 evaluation prompts |
|---|---|---|
| 4-bit | {acc['int4_before']:.3f} | {keep['int4_before']:.3f} |
| 4-bit + LoRA | {acc['int4_after']:.3f} | {keep['int4_after']:.3f} |
| float | {acc['float_before']:.3f} | {keep['float_before']:.3f} |
| float + its LoRA | {acc['float_after']:.3f} | {keep['float_after']:.3f} |

Training memory (MiB; each training in its own process; the step's arguments and temporaries
are XLA's account of the compiled training step; resident: the process's peak):

| base | transformer | step args | step temps | peak resident | device peak | final loss | s |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Figure: `lora_example.png` (rows: render, 4-bit, 4-bit + LoRA, float + LoRA).
"""


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", type=Path, help="the demo run folder (pipeline/, classifier/)")
  parser.add_argument("--pipeline", type=Path, default=None,
                      help="the float demo pipeline (default: RUN/pipeline)")
  parser.add_argument("--classifier", type=Path, default=None,
                      help="the demo classifier folder (default: RUN/classifier)")
  parser.add_argument("--out", type=Path, default=None, help="default: RUN/lora_example")
  parser.add_argument("--train-child", nargs=3, type=Path, metavar=("MODEL", "DATA", "OUT"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
  add_config_flags(parser, ExampleConfig)
  args = parser.parse_args(argv)
  if args.train_child:
    config = ExampleConfig(**json.loads(args.config))
    _train_in_this_process(*args.train_child, config)
    return
  if args.run is None and (args.pipeline is None or args.classifier is None or args.out is None):
    parser.error("give --run, or --pipeline, --classifier and --out")
  config = config_from_flags(ExampleConfig, args)
  record = run(args.run, args.out or args.run / "lora_example", config, pipeline=args.pipeline,
               classifier_dir=args.classifier)
  print(json.dumps({k: record[k] for k in ("prompt_accuracy_held_out",
                                           "prompt_accuracy_eval_prompts")}, indent=2))


if __name__ == "__main__":
  main()
