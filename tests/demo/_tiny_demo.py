"""A tiny random demo pipeline (the demo's architecture at its smallest, exported as a diffusers
folder by `convert.export`) and a tiny random classifier folder, for the demo's tests."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.export import export_pipeline
from demo import architecture, classifier
from demo import tokenizer as demo_tokenizer
from models.clip import CLIPTextModel
from models.flux import FluxTransformer
from models.schedulers import scheduler_from_config
from models.t5 import T5Encoder
from models.tokenizers import Tokenizer
from pipelines import FluxPipeline

# Classifier labels: two of the demo's evaluation prompts and ten made-up training names.
LABELS = ["red apple", "fox face"] + [f"thing number {i}" for i in range(10)]


def write_tiny_model(folder: Path) -> Path:
  """A random FluxPipeline of the demo's layout (width 64, one block of each kind, 8-channel VAE
  stages) written as a diffusers folder; its tokenizers are learned from LABELS."""
  configs = architecture.demo_configs(width=64, double_blocks=1, single_blocks=1, text_width=64,
                                      text_layers=1, vocab_size=64, vae_channels=(8, 8, 8))
  base = demo_tokenizer.build_bpe(LABELS, 64)
  tokenizers = folder.parent / f"{folder.name}_tokenizers"
  demo_tokenizer.save_tokenizer(demo_tokenizer.clip_tokenizer(base), tokenizers / "clip")
  demo_tokenizer.save_tokenizer(demo_tokenizer.t5_tokenizer(base), tokenizers / "t5")
  pipe = FluxPipeline(
      transformer=FluxTransformer(configs.transformer, param_dtype=jnp.float32,
                                  rngs=nnx.Rngs(0)),
      vae=architecture.build_vae(configs, 1),
      text_encoder=CLIPTextModel(configs.text_encoder, rngs=nnx.Rngs(2)),
      text_encoder_2=T5Encoder(configs.text_encoder_2, rngs=nnx.Rngs(3)),
      tokenizer=Tokenizer.from_pretrained(tokenizers / "clip"),
      tokenizer_2=Tokenizer.from_pretrained(tokenizers / "t5"),
      scheduler=scheduler_from_config(architecture.scheduler_config()))
  return export_pipeline(pipe, folder, progress=False)


def write_tiny_classifier(folder: Path, seed: int = 0) -> Path:
  """A random classifier of LABELS (widths 8) with random renders."""
  model = classifier.EmojiClassifier(
      classifier.ClassifierConfig(num_classes=len(LABELS), widths=(8, 8, 8, 8)),
      rngs=nnx.Rngs(seed))
  renders = np.random.default_rng(seed).integers(0, 256, (len(LABELS), 32, 32, 3), np.uint8)
  return classifier.save_classifier(model, LABELS, folder, renders=renders)
