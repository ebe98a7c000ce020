"""demo.lora_example end to end on a tiny random demo run (random transformer, VAE, encoders and
classifier; the real renders of the held-out emoji): every output is written and consistent.

The numbers of a random model mean nothing; the experiment on the trained model is the lead's run.
"""

import json

import numpy as np
import pytest

from demo import architecture, classifier, data, lora_example, train
from demo import tokenizer as demo_tokenizer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A run folder as demo.train and demo.classifier leave it: pipeline/ and classifier/."""
  run = tmp_path_factory.mktemp("demo_run")
  config = train.TrainConfig(vocab_size=64, width=64, double_blocks=1, single_blocks=1,
                             text_width=64, text_layers=1, vae_channels=(8, 8, 8))
  emoji = data.select_emoji()
  prompts = [e.prompt for e in emoji]
  base = demo_tokenizer.build_bpe(prompts, config.vocab_size)
  demo_tokenizer.save_tokenizer(demo_tokenizer.clip_tokenizer(base), run / "tokenizer")
  demo_tokenizer.save_tokenizer(demo_tokenizer.t5_tokenizer(base), run / "tokenizer_2")
  modules = architecture.build_denoiser(config.configs(), 0)
  train.export_pipeline(run, modules, architecture.build_vae(config.configs(), 0))
  model = classifier.EmojiClassifier(classifier.ClassifierConfig(len(prompts), (8, 8, 8, 8)),
                                     rngs=classifier.nnx.Rngs(0))
  classifier.save_classifier(model, prompts, run / "classifier")
  return run


@pytest.mark.slow
def test_lora_example_writes_every_output(tiny_run, tmp_path):
  config = lora_example.ExampleConfig(emoji=2, steps=2, rank=2, batch_size=2, samples=1,
                                      preserve=1, calib_prompts=2, calib_steps=1)
  out = tmp_path / "lora_example"
  record = lora_example.run(tiny_run, out, config)
  _, held_out = data.split_emoji(data.select_emoji())
  assert record["emoji"] == [e.prompt for e in held_out[:2]]
  assert (out / "data" / "captions.txt").read_text().count("\n") == 3  # 2 taught, 1 kept
  assert json.loads((out / "lora_example.json").read_text()) == record
  for kind in ("int4", "float"):
    run = out / lora_example.RUNS[kind]
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "loss.png").is_file()
    memory = record["memory"][kind]
    assert memory["peak_rss_bytes"] > 10**7 and memory["step_memory"]["argument_bytes"] > 0
  # The quantized transformer is smaller than the float one, and so is its training step's input.
  int4, flt = record["memory"]["int4"], record["memory"]["float"]
  assert int4["base_parameter_bytes"] < 0.6 * flt["base_parameter_bytes"]
  assert int4["step_memory"]["argument_bytes"] < flt["step_memory"]["argument_bytes"]
  accuracies = record["prompt_accuracy_held_out"]
  assert set(accuracies) == {"int4_before", "int4_after", "float_before", "float_after"}
  assert all(0.0 <= v <= 1.0 for v in accuracies.values())
  assert (out / "lora_example.png").stat().st_size > 0
  report = (out / "LORA_EXAMPLE.md").read_text()
  assert record["emoji"][0] in report and "| int4 |" in report
  assert np.isfinite(int4["final_loss"])
