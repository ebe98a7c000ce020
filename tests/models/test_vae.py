"""AutoencoderKL: parity with diffusers (SD-like 4-channel and FLUX-like 16-channel), jit, bf16,
legacy attention key names, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import vae as convert_vae
from convert.safetensors_io import CheckpointError
from models.vae import AutoencoderKL, LatentDistribution, VAEConfig
from tests._checkpoints import rewrite_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

SD_LIKE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
FLUX_LIKE = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8,
                 latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159)


def _save_reference(folder, config: dict, seed: int = 0) -> torch.nn.Module:
  """A tiny random-init diffusers AutoencoderKL with perturbed norms, saved to `folder`."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():  # GroupNorm starts at (1, 0): perturb so its affine part is tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def _rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("config, shape", [(SD_LIKE, (2, 3, 16, 16)),
                                           (FLUX_LIKE, (1, 3, 16, 24))],
                         ids=["sd_like", "flux_like"])
def test_encode_decode_match_diffusers(tmp_path, np_rng, config, shape):
  ref_model = _save_reference(tmp_path, config)
  ours = AutoencoderKL.from_pretrained(tmp_path)
  x = np_rng.uniform(-1, 1, shape).astype(np.float32)
  factor = 2 ** (len(config["block_out_channels"]) - 1)
  z = np_rng.standard_normal(
      (shape[0], config["latent_channels"], shape[2] // factor, shape[3] // factor)
  ).astype(np.float32)
  with torch.no_grad():
    posterior = ref_model.encode(torch.from_numpy(x)).latent_dist
    ref_mean, ref_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    ref_image = ref_model.decode(torch.from_numpy(z)).sample.numpy()

  dist = nnx.jit(lambda m, a: m.encode(a))(ours, jnp.asarray(x))
  assert isinstance(dist, LatentDistribution)
  assert _rel_err(dist.mean, ref_mean) <= 1e-4
  assert _rel_err(dist.logvar, ref_logvar) <= 1e-4
  image = nnx.jit(lambda m, a: m.decode(a))(ours, jnp.asarray(z))
  assert image.shape == ref_image.shape
  assert _rel_err(image, ref_image) <= 1e-4


def test_scaling_and_config_follow_diffusers(tmp_path):
  _save_reference(tmp_path, FLUX_LIKE)
  cfg = convert_vae.config_from_json(json.loads((tmp_path / "config.json").read_text()))
  assert (cfg.latent_channels, cfg.use_quant_conv, cfg.use_post_quant_conv) == (16, False, False)
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  z = jnp.array([0.5, -2.0])
  np.testing.assert_allclose(model.scale_latents(z), (np.array([0.5, -2.0]) - 0.1159) * 0.3611,
                             rtol=1e-6)
  np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, rtol=1e-6)


def test_jit_bfloat16_and_sampling(tmp_path, np_rng):
  ref_model = _save_reference(tmp_path, SD_LIKE)
  x = np_rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x)).sample.numpy()  # decode(encode(x).mode())

  model = AutoencoderKL.from_pretrained(tmp_path)
  roundtrip = nnx.jit(lambda m, a: m(a))
  assert _rel_err(roundtrip(model, jnp.asarray(x)), ref) <= 1e-4

  bf16 = AutoencoderKL.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  out = roundtrip(bf16, jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  err16 = _rel_err(out.astype(jnp.float32), ref)
  # bf16 keeps 8 bits through ~15 convs: measured 3.8e-2 (torch's bf16 VAE: 2.5e-2 on such a model)
  assert err16 < 1e-1, err16
  # dtype is the computation dtype too (as for every model's from_pretrained): float32 input is
  # computed, and returned, in bfloat16.
  assert jax.eval_shape(lambda a: bf16(a), jnp.asarray(x)).dtype == jnp.bfloat16

  dist = nnx.jit(lambda m, a: m.encode(a))(model, jnp.asarray(x))
  draws = jax.vmap(dist.sample)(jax.random.split(jax.random.key(0), 256))
  np.testing.assert_allclose(draws.std(0).mean(), dist.std.mean(), rtol=0.1)


def test_presets_and_eval_shape():
  assert VAEConfig.sd().scaling_factor == 0.18215
  assert VAEConfig.sdxl().scaling_factor == 0.13025
  flux = VAEConfig.flux()
  assert (flux.latent_channels, flux.scaling_factor, flux.shift_factor) == (16, 0.3611, 0.1159)
  assert VAEConfig.from_dict(flux.to_dict()) == flux
  model = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.sdxl(), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model))
  assert leaves and all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
  n_params = sum(int(np.prod(v.shape)) for v in leaves)
  assert 83e6 < n_params < 84e6, n_params  # the SD/SDXL VAE: 83.65M parameters
  out = nnx.eval_shape(lambda m: m.decode(jnp.zeros((1, 4, 128, 128))), model)
  assert out.shape == (1, 3, 1024, 1024)




def test_legacy_attention_names_load(tmp_path, np_rng):
  ref_model = _save_reference(tmp_path, SD_LIKE)

  def to_legacy(tensors):
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      for part in ("encoder", "decoder"):
        for leaf in ("weight", "bias"):
          tensors[f"{part}.mid_block.attentions.0.{old}.{leaf}"] = tensors.pop(
              f"{part}.mid_block.attentions.0.{new}.{leaf}")

  rewrite_safetensors(tmp_path, to_legacy)
  z = np_rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model.decode(torch.from_numpy(z)).sample.numpy()
  assert _rel_err(AutoencoderKL.from_pretrained(tmp_path).decode(jnp.asarray(z)), ref) <= 1e-4


def test_bad_checkpoints_name_the_key(tmp_path):
  _save_reference(tmp_path, SD_LIKE)
  rewrite_safetensors(tmp_path, lambda t: t.pop("decoder.up_blocks.0.upsamplers.0.conv.weight"))
  with pytest.raises(CheckpointError,
                     match=r"missing keys \['decoder.up_blocks.0.upsamplers.0.conv.weight'\]"):
    AutoencoderKL.from_pretrained(tmp_path)

  _save_reference(tmp_path, SD_LIKE)
  rewrite_safetensors(tmp_path, lambda t: t.update({"encoder.extra.bias": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected keys \['encoder.extra.bias'\]"):
    AutoencoderKL.from_pretrained(tmp_path)

  _save_reference(tmp_path, SD_LIKE)
  rewrite_safetensors(
      tmp_path, lambda t: t.update({"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}))
  with pytest.raises(CheckpointError, match=r"'quant_conv.weight' has shape \(8, 8, 3, 3\), "
                                            r"expected \(8, 8, 1, 1\)"):
    AutoencoderKL.from_pretrained(tmp_path)

  _save_reference(tmp_path, FLUX_LIKE)  # a FLUX-like checkpoint with quant_conv left in
  rewrite_safetensors(
      tmp_path, lambda t: t.update({"quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32),
                                    "quant_conv.bias": np.zeros(32, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected keys \['quant_conv.bias', "
                                            r"'quant_conv.weight'\]"):
    AutoencoderKL.from_pretrained(tmp_path)


def test_bad_configs_and_inputs(tmp_path):
  _save_reference(tmp_path, SD_LIKE)
  raw = json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(CheckpointError, match="down_block_types"):
    convert_vae.config_from_json({**raw, "down_block_types": ["DownBlock2D", "DownBlock2D"]})
  with pytest.raises(CheckpointError, match="act_fn"):
    convert_vae.config_from_json({**raw, "act_fn": "gelu"})
  with pytest.raises(CheckpointError, match="tiling"):
    convert_vae.config_from_json({**raw, "tiling": True})
  with pytest.raises(CheckpointError, match="AutoencoderTiny"):
    convert_vae.config_from_json({**raw, "_class_name": "AutoencoderTiny"})
  model = nnx.eval_shape(lambda: AutoencoderKL(convert_vae.config_from_json(raw),
                                               rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"encode: expected \(B, 3, H, W\) with H, W multiples of 2"):
    model.encode(jnp.zeros((1, 3, 15, 16)))
  with pytest.raises(ValueError, match=r"decode: expected \(B, 4, H, W\)"):
    model.decode(jnp.zeros((1, 16, 8, 8)))
