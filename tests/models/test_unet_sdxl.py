"""UNetSDXL against diffusers' UNet2DConditionModel: small random SDXL-, SD 1.x- and SD 2.x-like
configurations, one full-width SDXL transformer block, the real configs' sizes, bad checkpoints."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import sdxl as convert_sdxl
from convert.mapping import convert_by_name
from convert.safetensors_io import CheckpointError
from convert.state import load_into, state_paths
from models.unet_sdxl import BasicTransformerBlock, UNetSDXL, UNetSDXLConfig
from tests._checkpoints import rewrite_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4
# SDXL's layout at toy size: no attention at the top level, a text_time addition embedding, linear
# projections, transformer depth 2 at the bottom level (and so in the mid block).
SDXL_LIKE = dict(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), cross_attention_dim=24, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=6 * 4 + 20, norm_num_groups=8)
# SD 1.x: 1x1-conv projections, attention at every level but the last, one head count, no
# addition embedding, two layers per block.
SD15_LIKE = dict(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
    cross_attention_dim=12, use_linear_projection=False, norm_num_groups=8)
# SD 2.x: linear projections, heads per level, three levels, no mid-block attention depth > 1.
SD2_LIKE = dict(
    sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2, 4), cross_attention_dim=12, use_linear_projection=True,
    norm_num_groups=4)
CONFIGS = {"sdxl_like": SDXL_LIKE, "sd15_like": SD15_LIKE, "sd2_like": SD2_LIKE}


def rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _perturb(module: torch.nn.Module, seed: int) -> None:
  """Noise on every parameter: norms away from (1, 0), conv_out and zero-init layers non-zero."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _save_reference(name: str, folder) -> torch.nn.Module:
  """A diffusers UNet2DConditionModel of config `name` in eval mode, saved to `folder`."""
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
  _perturb(model, 1)
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  """(name, diffusers UNet2DConditionModel in eval mode, the folder it was saved to)."""
  folder = tmp_path_factory.mktemp(request.param)
  return request.param, _save_reference(request.param, folder), folder


@pytest.fixture(scope="module")
def sdxl_like(tmp_path_factory):
  """(diffusers model, folder, our float32 model) of the SDXL-like config."""
  folder = tmp_path_factory.mktemp("sdxl_like")
  model = _save_reference("sdxl_like", folder)
  return model, folder, UNetSDXL.from_pretrained(folder)


def _inputs(config: dict, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  size = config["sample_size"]
  inputs = {"sample": rng.standard_normal((batch, 4, size, size)).astype(np.float32),
            "timestep": np.array([981.0, 15.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal(
                (batch, 5, config["cross_attention_dim"])).astype(np.float32)}
  if config.get("addition_embed_type") == "text_time":
    width = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs["text_embeds"] = rng.standard_normal((batch, width)).astype(np.float32)
    inputs["time_ids"] = np.tile(np.array([[1024, 768, 0, 64, 1024, 1024]], np.float32),
                                 (batch, 1))
  return inputs


def _reference_forward(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  added = ({"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
           if "text_embeds" in t else None)
  with torch.no_grad():
    return model(t["sample"], t["timestep"], t["encoder_hidden_states"],
                 added_cond_kwargs=added).sample.double().numpy()


_FORWARD = nnx.jit(lambda m, x, t, c, a: m(x, t, c, a))


def _our_forward(model: UNetSDXL, inputs: dict[str, np.ndarray]) -> jax.Array:
  added = ({"text_embeds": jnp.asarray(inputs["text_embeds"]),
            "time_ids": jnp.asarray(inputs["time_ids"])} if "text_embeds" in inputs else None)
  return _FORWARD(model, jnp.asarray(inputs["sample"]), jnp.asarray(inputs["timestep"]),
                  jnp.asarray(inputs["encoder_hidden_states"]), added)


def test_unet_matches_diffusers(reference, sdxl_like):
  name, model, folder = reference
  inputs = _inputs(CONFIGS[name])
  expected = _reference_forward(model, inputs)
  ours = sdxl_like[2] if name == "sdxl_like" else UNetSDXL.from_pretrained(folder)
  got = _our_forward(ours, inputs)
  assert got.shape == expected.shape and got.dtype == jnp.float32
  assert rel_err(got, expected) <= TOLERANCE, rel_err(got, expected)


def test_addition_embedding_and_timestep_change_the_output(sdxl_like):
  """Guards the parity test: the time ids and the timestep reach the output."""
  _, _, ours = sdxl_like
  inputs = _inputs(SDXL_LIKE)
  base = np.asarray(_our_forward(ours, inputs))
  crop = dict(inputs, time_ids=inputs["time_ids"] + np.array([0, 0, 32, 0, 0, 0], np.float32))
  later = dict(inputs, timestep=inputs["timestep"] - 10)
  assert rel_err(_our_forward(ours, crop), base) > 1e-3
  assert rel_err(_our_forward(ours, later), base) > 1e-3


def test_bfloat16_stays_close(sdxl_like):
  model, folder, _ = sdxl_like
  inputs = _inputs(SDXL_LIKE)
  bf16 = UNetSDXL.from_pretrained(folder, dtype=jnp.bfloat16)
  got = _our_forward(bf16, inputs)
  assert got.dtype == jnp.bfloat16
  err = rel_err(got.astype(jnp.float32), _reference_forward(model, inputs))
  assert err < 5e-2, err  # bf16 weights and activations through ~20 layers


def _dict_source(state_dict: dict) -> object:
  """A `convert.mapping.TensorSource` over a torch state dict."""
  arrays = {k: v.detach().numpy() for k, v in state_dict.items()}

  class Source:
    def keys(self):
      return arrays.keys()

    def shape(self, key):
      return arrays[key].shape

    def get(self, key):
      return arrays[key]

  return Source()


@pytest.mark.slow
def test_full_width_sdxl_transformer_block_matches_diffusers():
  """One SDXL transformer block at full width (1280 channels, 20 heads of 64, text 2048)."""
  from diffusers.models.attention import BasicTransformerBlock as Reference

  torch.manual_seed(0)
  ref = Reference(1280, 20, 64, cross_attention_dim=2048, activation_fn="geglu",
                  attention_bias=False, upcast_attention=False, norm_type="layer_norm").eval()
  _perturb(ref, 2)
  ours = nnx.eval_shape(lambda: BasicTransformerBlock(1280, 20, 2048, dtype=None,
                                                      param_dtype=jnp.float32,
                                                      rngs=nnx.Rngs(0)))
  arrays = convert_by_name(_dict_source(ref.state_dict()), state_paths(ours), name="block")
  load_into(ours, arrays, source="block")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 64, 1280)).astype(np.float32)
  context = rng.standard_normal((2, 77, 2048)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context))
  got = nnx.jit(lambda m, a, c: m(a, c))(ours, jnp.asarray(x), jnp.asarray(context))
  assert rel_err(got, expected.double().numpy()) <= TOLERANCE


@pytest.mark.parametrize("preset", ["sdxl", "sd15", "sd2"])
def test_real_configs_have_diffusers_parameter_count(preset):
  """The released configs, built without allocating on both sides, have the same parameters."""
  config = getattr(UNetSDXLConfig, preset)()
  ours = nnx.eval_shape(lambda: UNetSDXL(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(ours, nnx.Param))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(**kwargs)
  theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == sum(
      int(np.prod(s)) for s in theirs.values())
  assert len(leaves) == len(theirs)
  if preset == "sdxl":
    assert 2.56e9 < sum(int(np.prod(s)) for s in theirs.values()) < 2.57e9
  assert UNetSDXLConfig.from_dict(config.to_dict()) == config
  if preset == "sdxl":  # SDXL-Turbo: the same layers, trained at 512x512
    turbo = UNetSDXLConfig.sdxl_turbo()
    assert dataclasses.replace(turbo, sample_size=config.sample_size) == config
    assert turbo.sample_size == 64


def test_config_from_diffusers_json(reference):
  name, _, folder = reference
  raw = json.loads((folder / "config.json").read_text())
  config = convert_sdxl.config_from_json(raw)
  expected = CONFIGS[name]
  assert config.block_out_channels == expected["block_out_channels"]
  assert config.use_linear_projection == expected["use_linear_projection"]
  assert config.addition_embed_type == expected.get("addition_embed_type")


@pytest.mark.parametrize("change,message", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"addition_embed_type": "image"}, "addition_embed_type"),
    ({"transformer_layers_per_block": [[1], [2, 2]]}, "per-layer"),
    ({"attention_head_dim": [3, 4]}, "not divisible by the number of heads"),
    ({"conv_in_kernel": 1}, "conv_in_kernel"),
    ({"some_new_option": True}, "some_new_option"),
    ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
], ids=["class_embed", "lcm", "mid_block", "addition", "per_layer", "heads", "conv_in", "unknown",
        "class"])
def test_unsupported_configs_are_checkpoint_errors(sdxl_like, change, message):
  _, folder, _ = sdxl_like
  raw = json.loads((folder / "config.json").read_text())
  with pytest.raises(CheckpointError, match=message):
    convert_sdxl.config_from_json({**raw, **change})


def test_bad_checkpoints_name_the_key(sdxl_like, tmp_path):
  _, folder, _ = sdxl_like
  for file in ("config.json", "diffusion_pytorch_model.safetensors"):
    (tmp_path / file).write_bytes((folder / file).read_bytes())
  key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"
  rewrite_safetensors(tmp_path, lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=rf"missing keys \['{key}'\]"):
    UNetSDXL.from_pretrained(tmp_path)
  rewrite_safetensors(tmp_path, lambda t: t.update({key: np.zeros((32, 7), np.float32)}))
  with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(32, 7\), expected \(32, 24\)"):
    UNetSDXL.from_pretrained(tmp_path)


def test_bad_inputs_are_value_errors():
  config = UNetSDXLConfig(**{k: v for k, v in SDXL_LIKE.items()})
  model = nnx.eval_shape(lambda: UNetSDXL(config, rngs=nnx.Rngs(0)))
  context = jnp.zeros((1, 5, 24))
  with pytest.raises(ValueError, match="multiples of 2"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 4, 7, 8)), 1.0, context), model)
  with pytest.raises(ValueError, match="added_cond_kwargs"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 4, 8, 8)), 1.0, context), model)
  with pytest.raises(ValueError, match=r"6 \* 4 = 44|P \+ n"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 4, 8, 8)), 1.0, context,
                               {"text_embeds": jnp.zeros((1, 20)),
                                "time_ids": jnp.zeros((1, 5))}), model)
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 4, 8, 8)), 1.0, jnp.zeros((1, 5, 12))), model)
