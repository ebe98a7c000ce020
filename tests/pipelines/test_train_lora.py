"""pipelines.train_lora: a LoRA trained on a tiny 4-bit FLUX transformer lowers the loss, leaves
the base untouched, resumes exactly from its checkpoint, and its file gives in diffusers (peft)
and in our apply path what the training forward computed.

Each test compiles a training step or forward of a (one double, one single block) model: slow.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipelines.train_lora import (
  EncodedData,
  LoRATrainConfig,
  make_loss,
  target_shapes,
  train_adapter,
)
from svdq_jax import QuantConfig, quantize_model
from svdq_jax.errors import InputError
from svdq_jax.lora import apply_loras, with_lora_branches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _flux_reference import TINY  # noqa: E402

from models.flux import FluxConfig, FluxTransformer  # noqa: E402

pytestmark = pytest.mark.slow
BLOCKS = dict(num_layers=1, num_single_layers=1)
CONFIG = LoRATrainConfig(rank=4, alpha=8.0, steps=16, batch_size=2, learning_rate=3e-2,
                         checkpoint_every=8, max_sequence_length=8)
QUANT = QuantConfig.preset(group_size=16, smooth=None, svd_iters=1, rank=8)


def _transformer(quantized: bool = True) -> FluxTransformer:
  config = FluxConfig(**{**{k: v for k, v in TINY.items() if k != "patch_size"}, **BLOCKS})
  model = FluxTransformer(config, rngs=nnx.Rngs(0))
  if quantized:
    quantize_model(model, None, QUANT, progress=False)
  return model


def _data(n: int = 3, seed: int = 0) -> EncodedData:
  """Random 'latents' (4x4 latent grid: 4 packed tokens) and text features."""
  rng = np.random.default_rng(seed)
  return EncodedData(
      latents=rng.standard_normal((n, 4, TINY["in_channels"])).astype(np.float32),
      prompt_embeds=rng.standard_normal((n, 8, TINY["joint_attention_dim"])).astype(np.float32),
      pooled=rng.standard_normal((n, TINY["pooled_projection_dim"])).astype(np.float32),
      latent_hw=(4, 4))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A LoRA trained for CONFIG.steps on the 4-bit model, and the model's state before."""
  model = _transformer()
  before = jax.tree.map(np.array, nnx.state(model))
  out = tmp_path_factory.mktemp("lora_run")
  result = train_adapter(model, _data(), out, CONFIG, progress=False)
  return model, before, out, result


def _mean_loss(model, factors, data, keys: int = 8) -> float:
  """The loss averaged over fixed keys and the whole data set (a deterministic measure)."""
  loss = jax.jit(make_loss(model, CONFIG, data.latent_hw))
  state = nnx.state(model)
  return float(np.mean([loss(factors, state, jnp.asarray(data.latents),
                             jnp.asarray(data.prompt_embeds), jnp.asarray(data.pooled),
                             jax.random.key(100 + i)) for i in range(keys)]))


def test_training_lowers_the_loss_and_leaves_the_4bit_base_untouched(trained):
  model, before, _, result = trained
  data = _data()
  zero = jax.tree.map(np.zeros_like, result.factors)
  assert _mean_loss(model, result.factors, data) < 0.9 * _mean_loss(model, zero, data)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(model)), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  shapes = target_shapes(model, CONFIG.targets)
  assert set(result.factors) == set(shapes)
  assert "transformer_blocks/0/norm1/linear/kernel" not in shapes  # AdaLN is not a target
  assert all(np.any(layer["lora_up"]) for layer in result.factors.values())  # every layer learned


def test_the_run_folder_holds_the_lora_curve_and_memory(trained):
  _, _, out, result = trained
  assert result.lora_file == out / "pytorch_lora_weights.safetensors" and result.lora_file.exists()
  assert (out / "loss.png").stat().st_size > 0
  assert len((out / "loss.csv").read_text().splitlines()) == CONFIG.steps == len(result.losses)
  record = json.loads((out / "train_lora.json").read_text())
  assert record["steps"] == CONFIG.steps and record["config"]["rank"] == CONFIG.rank
  assert record["peak_rss_bytes"] > 10**7
  assert record["step_memory"]["argument_bytes"] > record["base_parameter_bytes"] > 0


def test_the_trained_file_applies_as_the_training_forward_computed(trained):
  """The file, read back and concatenated onto the 4-bit branches (bfloat16), gives the output
  of the training forward (separate float32 branch)."""
  from convert.lora import load_loras

  model, _, _, result = trained
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(3)
  inputs = dict(hidden_states=rng.standard_normal((1, 16, 16)), timestep=np.array([0.4]),
                encoder_hidden_states=rng.standard_normal((1, 8, 32)),
                pooled_projections=rng.standard_normal((1, 24)), guidance=np.array([3.5]),
                img_ids=np.stack([np.zeros(16), *np.divmod(np.arange(16), 4)], -1),
                txt_ids=np.zeros((8, 3)))
  inputs = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
  forward = jax.jit(lambda st: nnx.merge(graphdef, st)(**inputs))
  trained_out = np.asarray(forward(with_lora_branches(state, result.factors, CONFIG.scale)))
  adapters, strengths = load_loras("flux", [(result.lora_file, 1.0)], state)
  applied = np.asarray(forward(apply_loras(state, adapters, strengths)))
  base = np.asarray(forward(state))
  delta = np.abs(trained_out - base).max()
  assert delta > 1e-3  # the LoRA does something
  assert np.abs(applied - trained_out).max() < 0.05 * delta  # bf16 branch factors


def test_resume_from_the_checkpoint_is_exact(trained, tmp_path):
  """N/2 steps, then the same run to N in the same folder: identical factors and losses."""
  _, _, _, full = trained
  model = _transformer()
  half = LoRATrainConfig(**{**CONFIG.to_dict(), "steps": CONFIG.steps // 2})
  train_adapter(model, _data(), tmp_path, half, progress=False)
  resumed = train_adapter(model, _data(), tmp_path, CONFIG, progress=False)
  for path, layer in full.factors.items():
    for part, value in layer.items():
      np.testing.assert_array_equal(resumed.factors[path][part], value)
  np.testing.assert_array_equal(resumed.losses, full.losses)
  other = LoRATrainConfig(**{**CONFIG.to_dict(), "rank": 2})
  with pytest.raises(InputError, match="another config .*rank"):
    train_adapter(model, _data(), tmp_path, other, progress=False)


@pytest.mark.parity
def test_a_lora_trained_here_loads_in_diffusers(tmp_path):
  """Trained on a float tiny FLUX that diffusers also loads: diffusers' load_lora_adapter (peft)
  of the written file gives the training forward's output."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  from _flux_reference import make_inputs, reference_forward, save_reference

  reference = save_reference(tmp_path / "transformer", **BLOCKS)
  model = FluxTransformer.from_pretrained(tmp_path / "transformer")
  config = LoRATrainConfig(**{**CONFIG.to_dict(), "steps": 3})
  result = train_adapter(model, _data(), tmp_path / "run", config, progress=False)
  inputs = make_inputs({**TINY, **BLOCKS})
  graphdef, state = nnx.split(model)
  ours = np.asarray(nnx.merge(graphdef, with_lora_branches(state, result.factors, config.scale))(
      **{k: jnp.asarray(v) for k, v in inputs.items()}))
  base = reference_forward(reference, inputs)
  reference.load_lora_adapter(str(result.lora_file), prefix="transformer", adapter_name="t")
  with torch.no_grad():
    expected = reference_forward(reference, inputs)
  assert np.abs(expected - base).max() > 1e-3
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
