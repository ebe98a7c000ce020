"""convert.flux: the diffusers FLUX key table, config mapping, tensor layout and bad checkpoints."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert import flux as convert_flux
from convert.loading import state_paths
from convert.safetensors_io import CheckpointError, CheckpointReader
from models.flux import FluxConfig, FluxTransformer
from tests._checkpoints import rewrite_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.models._flux_reference import TINY, save_reference  # noqa: E402  (needs torch)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_key_table_matches_diffusers_full_size(guidance):
  """Every key and shape of FLUX.1-dev/schnell, from diffusers' model built on the meta device."""
  with torch.device("meta"):
    reference = diffusers.FluxTransformer2DModel(guidance_embeds=guidance)
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}

  table = convert_flux.key_table(FluxConfig(guidance_embeds=guidance))

  assert {k: e.shape for k, e in table.items()} == expected


def test_key_table_targets_are_the_model_parameters():
  """Our side of the table: exactly the parameters of FluxTransformer(dev), in our layout."""
  config = FluxConfig.dev()
  model = nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0)))
  table = convert_flux.key_table(config)

  ours = {e.ours: e.shape[::-1] if e.transpose else e.shape for e in table.values()}

  assert ours == {path: spec.shape for path, spec in state_paths(model).items()}


def test_convert_state_layout(tmp_path):
  reference = save_reference(tmp_path)
  state = {k: v.numpy() for k, v in reference.state_dict().items()}

  with CheckpointReader(tmp_path) as reader:
    arrays = convert_flux.convert_state(reader, convert_flux.config_from_json(
        json.loads((tmp_path / "config.json").read_text())))
    kernel = np.array(arrays["transformer_blocks/1/attn/to_out/0/kernel"])
    proj_out = np.array(arrays["single_transformer_blocks/0/proj_out/kernel"])
    norm = np.array(arrays["single_transformer_blocks/1/attn/norm_k/scale"])
    ff = np.array(arrays["transformer_blocks/0/ff_context/net/2/bias"])

  assert len(arrays) == len(state)
  np.testing.assert_array_equal(kernel, state["transformer_blocks.1.attn.to_out.0.weight"].T)
  np.testing.assert_array_equal(proj_out, state["single_transformer_blocks.0.proj_out.weight"].T)
  np.testing.assert_array_equal(norm, state["single_transformer_blocks.1.attn.norm_k.weight"])
  np.testing.assert_array_equal(ff, state["transformer_blocks.0.ff_context.net.2.bias"])


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  reference = save_reference(tmp_path, dtype=torch.bfloat16)
  expected = reference.state_dict()["single_transformer_blocks.0.proj_mlp.weight"].float().numpy()

  model = FluxTransformer.from_pretrained(tmp_path)

  kernel = np.asarray(model.single_transformer_blocks[0].proj_mlp.kernel[...])
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, expected.T)


def test_config_from_json(tmp_path):
  save_reference(tmp_path, guidance_embeds=False, axes_dims_rope=(8, 4, 4), out_channels=4)
  raw = json.loads((tmp_path / "config.json").read_text())

  config = convert_flux.config_from_json(raw)

  assert config == FluxConfig(**{**TINY, "guidance_embeds": False, "axes_dims_rope": (8, 4, 4),
                                 "out_channels": 4})
  # FLUX.1-dev's config.json as published (older diffusers: no axes_dims_rope / out_channels).
  published_dev = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
                   "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
                   "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                   "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
  assert convert_flux.config_from_json(published_dev) == FluxConfig.dev()
  assert "FluxTransformer2DModel" in convert_flux.MODEL_TYPES


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "PixArtTransformer2DModel"}, "is not a FLUX transformer"),
    ({"use_fancy_rope": True}, r"unsupported FluxTransformer2DModel fields \['use_fancy_rope'\]"),
    ({"axes_dims_rope": [16, 56, 60]}, "must sum to attention_head_dim"),
])
def test_config_from_json_rejects(change, message):
  raw = {"_class_name": "FluxTransformer2DModel", **FluxConfig.dev().to_dict(), **change}
  for ours in ("rope_theta", "mlp_ratio", "split_proj_out"):  # ours, not diffusers' fields
    raw.pop(ours)
  with pytest.raises(CheckpointError, match=message):
    convert_flux.config_from_json(raw)




def test_missing_key_is_named(tmp_path):
  save_reference(tmp_path)
  key = "transformer_blocks.1.attn.norm_added_k.weight"
  rewrite_safetensors(tmp_path, lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=rf"missing keys \['{re.escape(key)}'\] \(1\)"):
    FluxTransformer.from_pretrained(tmp_path)


def test_unexpected_key_is_named(tmp_path):
  save_reference(tmp_path)
  key = "time_text_embed.guidance_embedder.linear_1.weight"
  guidance_keys = [f"time_text_embed.guidance_embedder.linear_{i}.{leaf}"
                   for i in (1, 2) for leaf in ("bias", "weight")]
  # A schnell config with a dev checkpoint: all guidance_embedder tensors are unexpected.
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
  rewrite_safetensors(tmp_path, lambda t: t.update({key: np.zeros((32, 256), np.float32)}))
  with pytest.raises(CheckpointError,
                     match=re.escape(f"unexpected keys {guidance_keys} (4)")):
    FluxTransformer.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
  save_reference(tmp_path)
  key = "single_transformer_blocks.0.proj_out.weight"
  rewrite_safetensors(tmp_path, lambda t: t.update({key: np.zeros((32, 128), np.float32)}))
  with pytest.raises(CheckpointError,
                     match=re.escape(f"key '{key}' has shape (32, 128), expected (32, 160)")):
    FluxTransformer.from_pretrained(tmp_path)


def test_wrong_dtype_is_named(tmp_path):
  save_reference(tmp_path)
  key = "x_embedder.bias"
  rewrite_safetensors(tmp_path, lambda t: t.update({key: np.zeros((32,), np.int32)}))
  with pytest.raises(CheckpointError, match=re.escape(f"key '{key}' has dtype int32")):
    FluxTransformer.from_pretrained(tmp_path)


def test_float8_checkpoint_is_rejected_by_name(tmp_path):
  """FP8 tensors (e.g. a quantized export) are not a float checkpoint this converter reads."""
  save_reference(tmp_path)
  key = "proj_out.weight"
  rewrite_safetensors(tmp_path, lambda t: t.update({key: t[key].astype(ml_dtypes.float8_e4m3fn)}))
  with pytest.raises(CheckpointError, match=re.escape(f"key '{key}' has dtype float8_e4m3fn")):
    FluxTransformer.from_pretrained(tmp_path)
