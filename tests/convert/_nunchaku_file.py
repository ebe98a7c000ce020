"""A synthetic Nunchaku FLUX.1 single file: DeepCompressor-packed random quantized blocks (see
_nunchaku_reference), random bf16 for the rest, and the float model it approximates. Shared by the
import tests of convert and cli."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from convert import flux
from convert import nunchaku as nk
from convert import nunchaku_checkpoint as nc
from convert.safetensors_io import save_file
from models.flux import FluxConfig, FluxTransformer
from tests.convert import _nunchaku_reference as ref

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


QUANTIZATION = {
    "int4": {"method": "svdquant",
             "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
             "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}},
    "nvfp4": {"method": "svdquant",
              "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"],
                         "group_size": 16},
              "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan",
                             "group_size": 16}},
}


def flux_inputs(config: FluxConfig, seed: int = 1) -> dict:
  """Random keyword inputs of a `FluxTransformer` of `config`: one image of 16 tokens, 8 text
  tokens, no guidance."""
  keys = jax.random.split(jax.random.key(seed), 3)
  s, t = 16, 8
  return dict(
      hidden_states=jax.random.normal(keys[0], (1, s, config.in_channels)),
      encoder_hidden_states=jax.random.normal(keys[1], (1, t, config.joint_attention_dim)),
      pooled_projections=jax.random.normal(keys[2], (1, config.pooled_projection_dim)),
      timestep=jnp.array([0.5]), img_ids=jnp.zeros((s, 3)), txt_ids=jnp.zeros((t, 3)),
      guidance=None)


def build_nunchaku_file(file, config: FluxConfig, np_rng, rank=32, precision="int4",
                        float_params=True, layers: dict | None = None):
  """Writes a Nunchaku single file for `config` (DeepCompressor-packed quantized blocks, random
  bf16 for the rest) and returns the float parameters of the diffusers-layout model it
  approximates (our paths, split_proj_out), or None without `float_params` (large widths: the
  16-bit tensors are then drawn directly, N(0, 1 / in_features)).

  INT4 blocks shift the MLP down-projections' inputs as Nunchaku does; NVFP4 ones give each fused
  q/k/v one tensor scale per part, which DeepCompressor stores as per-channel wcscales. `layers`,
  when given, receives each W4A4 layer's `RandomLayer` by its Nunchaku name."""
  dim = config.inner_dim
  params = None
  if float_params:
    float_model = FluxTransformer(config, rngs=nnx.Rngs(0))
    params = {"/".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(float_model, nnx.Param))}
  tensors = {}
  for key, entry in flux.key_table(config).items():
    if key.startswith(nc.BLOCK_PREFIXES):
      continue
    if params is None:
      scale = 1 / np.sqrt(entry.shape[-1]) if entry.transpose else 0.1
      tensors[key] = (np_rng.normal(0, scale, entry.shape)).astype(BF16)
      continue
    value = params[entry.ours].astype(BF16)
    params[entry.ours] = value.astype(np.float32)
    tensors[key] = np.ascontiguousarray(value.T if entry.transpose else value)
  for prefix, ours, w4a4, adanorm, norms in nc.block_layers(config):
    shapes = SHAPES if w4a4 is nc.DOUBLE else SINGLE_SHAPES
    for lname, (paths, shifted) in w4a4.items():
      k, n = (dim * f for f in shapes[lname])
      channel = None
      if precision == "nvfp4" and len(paths) == 3:
        channel = np.repeat(np_rng.uniform(1e-5, 1e-4, 3), n // 3)
      layer = ref.random_layer(np_rng, k, n, rank, precision, channel_scales=channel)
      shift = nk.GELU_SHIFT if shifted and precision == "int4" else 0.0
      packed = ref.dc_pack(layer, shift=shift or None)
      tensors |= {f"{prefix}.{lname}.{t}": v for t, v in packed.items()}
      if layers is not None:
        layers[f"{prefix}.{lname}"] = layer
      if params is None:
        continue
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
      if params is not None:
        s = np.repeat(scales.astype(np.float64).T, 64, axis=1)
        params[f"{ours}/{path}/kernel"] = (codes * s).T.astype(np.float32)
        params[f"{ours}/{path}/bias"] = bias.astype(np.float32)
    for lname, path in norms.items():
      value = np_rng.uniform(0.5, 1.5, (config.attention_head_dim,)).astype(BF16)
      tensors[f"{prefix}.{lname}.weight"] = value
      if params is not None:
        params[f"{ours}/{path}/scale"] = value.astype(np.float32)
  quant = {**QUANTIZATION[precision], "rank": rank}
  save_file(tensors, file, metadata={"config": json.dumps(_diffusers_config(config)),
                                     "comfy_config": "{}", "model_class": nc.FLUX_CLASS,
                                     "quantization_config": json.dumps(quant)})
  return params


SMALL = FluxConfig(num_layers=1, num_single_layers=1, num_attention_heads=2,
                   attention_head_dim=64, axes_dims_rope=(16, 24, 24), joint_attention_dim=64,
                   pooled_projection_dim=32, in_channels=16)
