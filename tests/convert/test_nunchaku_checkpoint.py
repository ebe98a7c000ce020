"""convert.nunchaku_checkpoint: a synthetic Nunchaku FLUX single file, built with DeepCompressor's
packer from random quantized layers, imported and run; and the one-line errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert import flux
from convert import nunchaku as nk
from convert import nunchaku_checkpoint as nc
from convert.safetensors_io import CheckpointError, CheckpointReader, save_file
from models.flux import FluxConfig, FluxTransformer
from tests.convert import _nunchaku_reference as ref

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BF16 = ml_dtypes.bfloat16
SHAPES = {"qkv_proj": (1, 3), "qkv_proj_context": (1, 3), "out_proj": (1, 1),
          "out_proj_context": (1, 1), "mlp_fc1": (1, 4), "mlp_fc2": (4, 1),
          "mlp_context_fc1": (1, 4), "mlp_context_fc2": (4, 1)}
SINGLE_SHAPES = {"qkv_proj": (1, 3), "mlp_fc1": (1, 4), "out_proj": (1, 1), "mlp_fc2": (4, 1)}


def _diffusers_config(config: FluxConfig) -> dict:
  values = {k: v for k, v in config.to_dict().items() if k not in ("rope_theta", "mlp_ratio",
                                                                     "split_proj_out")}
  return {"_class_name": "FluxTransformer2DModel", **values}


def _float_weights(layer: ref.RandomLayer, stored_bias: np.ndarray, shift: float):
  """The float kernel (K, N) and bias that the quantized layer approximates (notes 3.5 without
  the activation rounding): R / smooth + down^T up^T, and bias + (shift / smooth) @ R."""
  residual = layer.values().T / layer.smooth.astype(np.float64)[:, None]
  kernel = residual + layer.down.astype(np.float64).T @ layer.up.astype(np.float64).T
  return kernel, stored_bias.astype(np.float64) + shift * residual.sum(axis=0)


def build_nunchaku_file(file, config: FluxConfig, np_rng, rank=32):
  """Writes a Nunchaku single file for `config` (DeepCompressor-packed quantized blocks, random
  bf16 for the rest) and returns the float parameters of the diffusers-layout model it
  approximates (our paths, split_proj_out)."""
  dim = config.inner_dim
  float_model = FluxTransformer(config, rngs=nnx.Rngs(0))
  params = {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(float_model, nnx.Param))}
  tensors = {}
  for key, entry in flux.key_table(config).items():
    if not key.startswith(nc.BLOCK_PREFIXES):
      value = params[entry.ours].astype(BF16)
      params[entry.ours] = value.astype(np.float32)
      tensors[key] = np.ascontiguousarray(value.T if entry.transpose else value)
  for prefix, ours, w4a4, adanorm, norms in nc._block_layers(config):
    shapes = SHAPES if w4a4 is nc.DOUBLE else SINGLE_SHAPES
    for lname, (paths, shifted) in w4a4.items():
      k, n = (dim * f for f in shapes[lname])
      layer = ref.random_layer(np_rng, k, n, rank)
      shift = nk.GELU_SHIFT if shifted else 0.0
      packed = ref.dc_pack(layer, shift=shift or None)
      tensors |= {f"{prefix}.{lname}.{t}": v for t, v in packed.items()}
      kernel, bias = _float_weights(layer, nk.unpack_scales(packed["bias"]), shift)
      for i, path in enumerate(paths):
        cols = slice(i * dim, (i + 1) * dim) if len(paths) == 3 else slice(None)
        params[f"{ours}/{path}/kernel"] = kernel[:, cols].astype(np.float32)
        params[f"{ours}/{path}/bias"] = bias[cols].astype(np.float32)
    for lname, (path, splits) in adanorm.items():
      n = splits * dim
      codes = np_rng.integers(-7, 8, (n, dim)).astype(np.int8)
      scales = (np_rng.uniform(0.5, 2.0, (dim // 64, n)) * 1e-2).astype(BF16)
      bias = np_rng.normal(0, 0.2, (n,)).astype(BF16)
      tensors |= {f"{prefix}.{lname}.{t}": v for t, v in
                  ref.dc_pack_w4a16(codes, scales, bias, zero=None, splits=splits).items()}
      s = np.repeat(scales.astype(np.float64).T, 64, axis=1)
      params[f"{ours}/{path}/kernel"] = (codes * s).T.astype(np.float32)
      params[f"{ours}/{path}/bias"] = bias.astype(np.float32)
    for lname, path in norms.items():
      value = np_rng.uniform(0.5, 1.5, (config.attention_head_dim,)).astype(BF16)
      tensors[f"{prefix}.{lname}.weight"] = value
      params[f"{ours}/{path}/scale"] = value.astype(np.float32)
  quant = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None,
                                             "group_size": 64},
           "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}, "rank": rank}
  save_file(tensors, file, metadata={"config": json.dumps(_diffusers_config(config)),
                                     "comfy_config": "{}", "model_class": nc.FLUX_CLASS,
                                     "quantization_config": json.dumps(quant)})
  return params


def _inputs(config: FluxConfig, seed=1):
  keys = jax.random.split(jax.random.key(seed), 3)
  s, t = 16, 8
  return dict(
      hidden_states=jax.random.normal(keys[0], (1, s, config.in_channels)),
      encoder_hidden_states=jax.random.normal(keys[1], (1, t, config.joint_attention_dim)),
      pooled_projections=jax.random.normal(keys[2], (1, config.pooled_projection_dim)),
      timestep=jnp.array([0.5]), img_ids=jnp.zeros((s, 3)), txt_ids=jnp.zeros((t, 3)),
      guidance=None)


SMALL = FluxConfig(num_layers=1, num_single_layers=1, num_attention_heads=2,
                   attention_head_dim=64, axes_dims_rope=(16, 24, 24), joint_attention_dim=64,
                   pooled_projection_dim=32, in_channels=16)


@pytest.mark.slow
def test_import_runs_like_the_float_model_it_quantizes(tmp_path, np_rng):
  src = tmp_path / "svdq-int4_r32-flux.1-tiny.safetensors"
  params = build_nunchaku_file(src, SMALL, np_rng)
  dst = nc.import_nunchaku(src, tmp_path / "imported", progress=False)
  model = FluxTransformer.from_pretrained(dst)
  assert model.config.split_proj_out
  kernel = model.transformer_blocks[0].ff.net[2].kernel.get_value()
  assert kernel.act_shift == nk.GELU_SHIFT and kernel.rank == 32
  reference = FluxTransformer(dataclasses.replace(SMALL, split_proj_out=True),
                              rngs=nnx.Rngs(0))
  state = nnx.state(reference, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(jnp.asarray(params["/".join(map(str, path))]))
  nnx.update(reference, state)
  inputs = _inputs(SMALL)
  y = np.asarray(nnx.jit(lambda m, i: m(**i))(model, inputs))
  want = np.asarray(nnx.jit(lambda m, i: m(**i))(reference, inputs))
  rel = np.linalg.norm(y - want) / np.linalg.norm(want)
  assert rel < 0.15, rel  # 4-bit activations; a wrong layout or mapping gives ~1


def test_import_errors_are_one_line_and_write_nothing(tmp_path, np_rng):
  src = tmp_path / "n.safetensors"
  build_nunchaku_file(src, SMALL, np_rng)
  reader = CheckpointReader(src)
  tensors = {k: np.asarray(reader.get(k)) for k in reader.keys()}
  meta = dict(reader.metadata)

  def write(name, tensors=tensors, **changes):
    path = tmp_path / name
    save_file(tensors, path, metadata={**meta, **changes})
    return path

  cases = [
      (write("sdxl.safetensors", model_class="NunchakuSDXLUNet2DConditionModel"), "SDXL"),
      (write("sana.safetensors", model_class="NunchakuSanaTransformer2DModel"), "not supported"),
      (write("r20.safetensors", quantization_config=meta["quantization_config"].replace(
          '"rank": 32', '"rank": 20')), "rank 20"),
      (write("missing.safetensors", {k: v for k, v in tensors.items()
                                     if "single_transformer_blocks.0.mlp_fc2" not in k}),
       "missing quantized layer 'single_transformer_blocks.0.mlp_fc2'"),
      (write("shape.safetensors", tensors | {"transformer_blocks.0.out_proj.bias":
                                             tensors["transformer_blocks.0.out_proj.bias"][:64]}),
       "transformer_blocks.0.out_proj: tensor 'bias'"),
  ]
  plain = tmp_path / "plain.safetensors"
  save_file({"x": np.zeros(2, np.float32)}, plain)
  cases.append((plain, "not a Nunchaku checkpoint"))
  for path, match in cases:
    with pytest.raises(CheckpointError, match=match) as info:
      nc.import_nunchaku(path, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
