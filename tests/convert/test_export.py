"""convert.export: our float models and FluxPipeline -> diffusers / transformers folders.

The references are diffusers' and transformers' own `from_pretrained` of the exported folder (torch,
CPU, float32): the model they load must give our outputs on random inputs, and our converter must
read the folder back bit for bit. Tiny models of ours get random parameters
everywhere (no norm weight exactly one, no bias zero: a weight in the wrong slot shows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import convert
from convert import export as export_module
from convert.checkpoint import save_checkpoint
from convert.loading import load_into, path_str, state_paths
from convert.safetensors_io import CheckpointReader
from models.clip import CLIPTextConfig, CLIPTextModel
from models.flux import FluxConfig, FluxTransformer
from models.pixart import PixArtConfig, PixArtSigmaTransformer
from models.t5 import T5Config, T5Encoder
from models.vae import AutoencoderKL, VAEConfig
from svdq_jax import QuantConfig, quantize_linear
from svdq_jax.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4  # float32 outputs, max |ours - theirs| relative to max |theirs|


def rel_err(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def random_model(cls: type, config, seed: int) -> nnx.Module:
  """`cls(config)` with random parameters drawn in numpy (NNX's eager init is far slower):
  kernels N(0, 1/fan_in), embeddings N(0, 1/4), norm scales 1 + N(0, 0.05^2), other vectors
  N(0, 0.05^2), so that no norm weight is exactly one and no bias zero."""
  model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  arrays = {}
  for path, spec in state_paths(model).items():
    noise = rng.standard_normal(spec.shape)
    if path.endswith("kernel"):
      noise /= np.sqrt(np.prod(spec.shape[:-1]))
    elif path.endswith("embedding"):
      noise *= 0.5
    else:
      noise = 0.05 * noise + (1.0 if path.endswith("scale") else 0.0)
    arrays[path] = noise.astype(np.float32)
  return load_into(model, arrays, source="random")


def params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {path_str(p): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_bit_identical(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key].view(np.uint8), value.view(np.uint8), err_msg=key)


TINY_FLUX = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                       guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                     norm_num_groups=4, scaling_factor=1.5, shift_factor=0.06,
                     use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux(config: FluxConfig = TINY_FLUX, seed: int = 0) -> FluxTransformer:
  return random_model(FluxTransformer, config, seed)


# ----------------------------------------------------------------------------------------------
# Components: diffusers / transformers load the folder and compute what ours computes.


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_transformer_export(tmp_path, guidance):
  config = FluxConfig(**{**TINY_FLUX.to_dict(), "guidance_embeds": guidance})
  ours = tiny_flux(config)
  convert.export_model(ours, tmp_path / "transformer")
  theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()

  rng = np.random.default_rng(2)
  text_len, h, w = 5, 4, 3
  ids = np.stack(np.meshgrid(np.zeros(1), np.arange(h), np.arange(w), indexing="ij"), -1)
  inputs = {"hidden_states": rng.standard_normal((2, h * w, 16)),
            "encoder_hidden_states": rng.standard_normal((2, text_len, 32)),
            "pooled_projections": rng.standard_normal((2, 24)),
            "timestep": rng.uniform(0.05, 1.0, 2), "img_ids": ids.reshape(-1, 3),
            "txt_ids": np.zeros((text_len, 3))}
  if guidance:
    inputs["guidance"] = rng.uniform(1.0, 5.0, 2)
  inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
  with torch.no_grad():
    expected = theirs(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sample.numpy()
  got = nnx.jit(lambda m, kw: m(**kw))(ours, {k: jnp.asarray(v) for k, v in inputs.items()})
  assert got.shape == expected.shape
  assert rel_err(got, expected) <= TOLERANCE
  assert_bit_identical(params(FluxTransformer.from_pretrained(tmp_path / "transformer")),
                       params(ours))


@pytest.mark.parametrize("projection_dim", [None, 24], ids=["CLIPTextModel", "WithProjection"])
def test_clip_text_model_export(tmp_path, projection_dim):
  config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=12, eos_token_id=50,
                          projection_dim=projection_dim)
  ours = random_model(CLIPTextModel, config, 1)
  folder = convert.export_model(ours, tmp_path / "clip")
  saved = json.loads((folder / "config.json").read_text())
  reference_class = (transformers.CLIPTextModel if projection_dim is None
                     else transformers.CLIPTextModelWithProjection)
  assert saved["architectures"] == [reference_class.__name__]
  theirs = reference_class.from_pretrained(folder).eval()

  rng = np.random.default_rng(3)
  ids = rng.integers(51, 99, (2, 12))
  ids[:, 0], ids[0, 11], ids[1, 6:] = 0, 50, 50  # end-of-text 50 at 11 and at 6 (then padding)
  mask = np.ones((2, 12), np.int64)
  mask[1, 7:] = 0
  with torch.no_grad():
    out = theirs(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  got = nnx.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids, jnp.int32),
                                          jnp.asarray(mask, jnp.int32))
  assert rel_err(got.last_hidden_state, out.last_hidden_state.numpy()) <= TOLERANCE
  pooled = got.pooler_output if projection_dim is None else got.text_embeds
  expected = out.pooler_output if projection_dim is None else out.text_embeds
  assert rel_err(pooled, expected.numpy()) <= TOLERANCE
  assert_bit_identical(params(CLIPTextModel.from_pretrained(folder)), params(ours))


def test_t5_encoder_export(tmp_path):
  config = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16)
  ours = random_model(T5Encoder, config, 1)
  folder = convert.export_model(ours, tmp_path / "t5")
  theirs = transformers.T5EncoderModel.from_pretrained(folder).eval()

  rng = np.random.default_rng(4)
  ids = rng.integers(2, 40, (2, 9))
  mask = np.ones((2, 9), np.int64)
  ids[1, 6:], mask[1, 6:] = 0, 0
  with torch.no_grad():
    expected = theirs(torch.from_numpy(ids),
                      attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  got = nnx.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids, jnp.int32),
                                          jnp.asarray(mask, jnp.int32))
  assert rel_err(got, expected) <= TOLERANCE
  assert_bit_identical(params(T5Encoder.from_pretrained(folder)), params(ours))


def test_vae_export(tmp_path):
  ours = random_model(AutoencoderKL, TINY_VAE, 1)
  folder = convert.export_model(ours, tmp_path / "vae")
  theirs = diffusers.AutoencoderKL.from_pretrained(folder).eval()
  assert theirs.config.scaling_factor == 1.5 and theirs.config.shift_factor == 0.06

  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    posterior = theirs.encode(torch.from_numpy(x)).latent_dist
    image = theirs.decode(torch.from_numpy(z)).sample.numpy()
  dist = nnx.jit(lambda m, a: m.encode(a))(ours, jnp.asarray(x))
  assert rel_err(dist.mean, posterior.mean.numpy()) <= TOLERANCE
  assert rel_err(dist.logvar, posterior.logvar.numpy()) <= TOLERANCE
  assert rel_err(nnx.jit(lambda m, a: m.decode(a))(ours, jnp.asarray(z)), image) <= TOLERANCE
  assert_bit_identical(params(AutoencoderKL.from_pretrained(folder)), params(ours))


def test_bfloat16_export_round_trips_bit_for_bit(tmp_path):
  """dtype="bfloat16" writes BF16 tensors; a bf16 model keeps its dtype without a cast."""
  ours = tiny_flux()
  convert.export_model(ours, tmp_path / "cast", dtype="bfloat16")
  with CheckpointReader(tmp_path / "cast") as reader:
    assert {reader.dtype(k) for k in reader.keys()} == {np.dtype(ml_dtypes.bfloat16)}
  as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in params(ours).items()}
  loaded = FluxTransformer.from_pretrained(tmp_path / "cast", dtype=jnp.bfloat16)
  assert_bit_identical(params(loaded), as_bf16)
  convert.export_model(loaded, tmp_path / "kept")
  with CheckpointReader(tmp_path / "kept") as reader:
    assert {reader.dtype(k) for k in reader.keys()} == {np.dtype(ml_dtypes.bfloat16)}
  theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "kept",
                                                            torch_dtype=torch.bfloat16)
  key = "transformer_blocks.0.attn.to_q.weight"
  np.testing.assert_array_equal(theirs.state_dict()[key].float().numpy(),
                                as_bf16["transformer_blocks/0/attn/to_q/kernel"].T
                                .astype(np.float32))


# ----------------------------------------------------------------------------------------------
# The whole pipeline: diffusers' FluxPipeline loads the folder and makes our image.


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
  """Our tiny FluxPipeline built in memory (random models, the reference tokenizers)."""
  from models.schedulers import FlowMatchEulerScheduler
  from models.tokenizers import Tokenizer
  from pipelines import FluxPipeline
  from tests.pipelines._pipeline_reference import _clip_tokenizer, _t5_tokenizer

  folder = tmp_path_factory.mktemp("tokenizers")
  _clip_tokenizer().save_pretrained(folder / "clip")
  _t5_tokenizer().save_pretrained(folder / "t5")
  tokenizer, tokenizer_2 = Tokenizer.from_pretrained(folder / "clip"), Tokenizer.from_pretrained(
      folder / "t5")
  clip = CLIPTextConfig(vocab_size=tokenizer.backend.get_vocab_size(), hidden_size=24,
                        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=12,
                        eos_token_id=tokenizer.backend.token_to_id("<|endoftext|>"))
  t5 = T5Config(vocab_size=tokenizer_2.backend.get_vocab_size(), d_model=32, d_kv=8, d_ff=37,
                num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
  return FluxPipeline(
      transformer=tiny_flux(), vae=random_model(AutoencoderKL, TINY_VAE, 4),
      text_encoder=random_model(CLIPTextModel, clip, 6),
      text_encoder_2=random_model(T5Encoder, t5, 8),
      tokenizer=tokenizer, tokenizer_2=tokenizer_2,
      scheduler=FlowMatchEulerScheduler(shift=3.0, use_dynamic_shifting=True))


PROMPTS = ["a photo of a red cat", "a big old house by the river at night with a tree"]
SIZE = 32  # pixels: the VAE halves once, packing halves again: 8 x 8 tokens
MAX_SEQUENCE_LENGTH = 16


@pytest.mark.slow
def test_flux_pipeline_export_runs_in_diffusers(tiny_pipeline, tmp_path):
  from pipelines import FluxPipeline

  folder = convert.export_pipeline(tiny_pipeline, tmp_path / "flux", progress=False)
  index = json.loads((folder / "model_index.json").read_text())
  assert index["_class_name"] == "FluxPipeline"
  assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
  theirs = diffusers.FluxPipeline.from_pretrained(folder, dtype=torch.float32)

  for mine, reference, length in ((tiny_pipeline.tokenizer, theirs.tokenizer, 12),
                                  (tiny_pipeline.tokenizer_2, theirs.tokenizer_2,
                                   MAX_SEQUENCE_LENGTH)):
    expected = reference(PROMPTS, padding="max_length", max_length=length, truncation=True)
    np.testing.assert_array_equal(mine(PROMPTS, length).input_ids, expected.input_ids)

  latents = np.random.default_rng(9).standard_normal((2, 64, 16)).astype(np.float32)
  kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
  with torch.no_grad():
    expected = theirs(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                      **kwargs).images
  got = tiny_pipeline(PROMPTS, latents=latents, **kwargs)
  assert got.shape == expected.shape == (2, SIZE, SIZE, 3)
  print(f"FluxPipeline export: max |ours - diffusers| {np.abs(got - expected).max():.2e}")
  assert np.abs(got - expected).max() <= 1e-4  # images in [0, 1]; measured 9.2e-6
  assert np.abs(expected - expected[:, :1, :1]).max() > 0.05  # the images are not flat
  reloaded = FluxPipeline.from_pretrained(folder)(PROMPTS, latents=latents, **kwargs)
  np.testing.assert_array_equal(reloaded, got)


def test_pipeline_folder_of_our_checkpoints_exports_bit_for_bit(tiny_pipeline, tmp_path):
  """diffusers folder -> `convert` (ours) -> `export_pipeline(folder)`: the same tensors."""
  first = convert.export_pipeline(tiny_pipeline, tmp_path / "first", progress=False)
  convert.convert(first, tmp_path / "ours", progress=False)
  second = convert.export_pipeline(tmp_path / "ours", tmp_path / "second", progress=False)
  assert json.loads((second / "model_index.json").read_text()) == json.loads(
      (first / "model_index.json").read_text())
  for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
    assert json.loads((second / name / "config.json").read_text()) == json.loads(
        (first / name / "config.json").read_text())
    with CheckpointReader(first / name) as a, CheckpointReader(second / name) as b:
      assert_bit_identical({k: b.get(k) for k in b.keys()}, {k: a.get(k) for k in a.keys()})
  for name in ("tokenizer", "tokenizer_2", "scheduler"):
    assert sorted(os.listdir(second / name)) == sorted(os.listdir(first / name))


# ----------------------------------------------------------------------------------------------
# Bad input: one InputError, nothing written.


def _quantized_flux() -> FluxTransformer:
  model = tiny_flux(FluxConfig(**{**TINY_FLUX.to_dict(), "num_attention_heads": 4}))
  layer = model.transformer_blocks[0].attn.to_q
  layer.kernel.set_value(quantize_linear(layer.kernel.get_value(), None, None,
                                         QuantConfig.preset("w4a4")))
  return model


def _leftovers(parent: Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir())


def test_quantized_model_is_refused(tmp_path):
  model = _quantized_flux()
  with pytest.raises(InputError, match="quantized.*export the float model"):
    convert.export_model(model, tmp_path / "out")
  save_checkpoint(model, tmp_path / "ours", model_type="flux", config=model.config)
  with pytest.raises(InputError, match="quantized checkpoint"):
    convert.export_pipeline(tmp_path / "ours", tmp_path / "out")
  assert _leftovers(tmp_path) == ["ours"]


def test_quantized_pipeline_component_is_refused_before_writing(tiny_pipeline, tmp_path):
  folder = convert.export_pipeline(tiny_pipeline, tmp_path / "flux", progress=False)
  convert.convert(folder, tmp_path / "ours", progress=False)
  model = _quantized_flux()
  save_checkpoint(model, tmp_path / "ours" / "transformer", model_type="flux",
                  config=model.config, overwrite=True)
  with pytest.raises(InputError, match="transformer: a quantized checkpoint"):
    convert.export_pipeline(tmp_path / "ours", tmp_path / "out", progress=False)
  assert _leftovers(tmp_path) == ["flux", "ours"]


def test_existing_destination_needs_overwrite(tmp_path):
  model = tiny_flux()
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("old")
  with pytest.raises(InputError, match="already exists"):
    convert.export_model(model, tmp_path / "out")
  assert _leftovers(tmp_path / "out") == ["keep.txt"]
  convert.export_model(model, tmp_path / "out", overwrite=True)
  assert _leftovers(tmp_path / "out") == ["config.json", "diffusion_pytorch_model.safetensors"]
  assert _leftovers(tmp_path) == ["out"]


def test_unknown_model_types_are_refused(tmp_path):
  with pytest.raises(InputError, match="Linear is not a model class we convert"):
    convert.export_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), tmp_path / "a")
  pixart = nnx.eval_shape(lambda: PixArtSigmaTransformer(
      PixArtConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                   num_layers=1, cross_attention_dim=16, sample_size=16, patch_size=2,
                   caption_channels=32), rngs=nnx.Rngs(0)))
  with pytest.raises(InputError, match="no exporter for 'pixart'"):
    convert.export_model(pixart, tmp_path / "b")
  with pytest.raises(InputError, match="export_pipeline: a dict"):
    convert.export_pipeline({}, tmp_path / "c")
  with pytest.raises(InputError, match="neither a pipeline folder"):
    convert.export_pipeline(tmp_path, tmp_path / "d")
  assert _leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(tiny_pipeline, tmp_path, monkeypatch):
  calls = []

  def failing_save_file(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 3:
      raise OSError("disk full")
    return convert.save_file(tensors, path, metadata)

  monkeypatch.setattr(export_module, "save_file", failing_save_file)
  with pytest.raises(OSError, match="disk full"):
    convert.export_pipeline(tiny_pipeline, tmp_path / "out", progress=False)
  assert len(calls) == 3
  assert _leftovers(tmp_path) == []
