"""calibrate + quantize_params on a small NNX model: selection, skipping, purity, jit, errors."""

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import svdq_jax
from models.layers import Linear
from svdq_jax import (
  QuantConfig,
  SVDQLinear,
  calibrate,
  quantize_model,
  quantize_params,
  selected_kernels,
  svdq_dot,
)
from svdq_jax import quantizers as qz
from svdq_jax.errors import InputError
from svdq_jax.metrics import model_bytes, relative_error

D = 128


class AdaNorm(nnx.Module):
  def __init__(self, rngs):
    self.linear = Linear(D, 2 * D, rngs=rngs)


class FeedForward(nnx.Module):
  def __init__(self, rngs):
    self.net = nnx.List([Linear(D, 2 * D, rngs=rngs), Linear(2 * D, D, rngs=rngs)])

  def __call__(self, x):
    return self.net[1](jax.nn.gelu(self.net[0](x), approximate=True))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = AdaNorm(rngs)
    self.to_q = Linear(D, D, rngs=rngs)
    self.ff = FeedForward(rngs)

  def __call__(self, x, temb):
    shift, scale = jnp.split(self.norm1.linear(jax.nn.silu(temb)), 2, axis=-1)
    h = x * (1 + scale[:, None]) + shift[:, None]
    h = x + self.to_q(h)
    return h + self.ff(h)


class TinyTransformer(nnx.Module):
  """FLUX-like names: x_embedder and proj_out stay 16-bit, norm1/linear is W4A16."""

  def __init__(self, rngs):
    self.x_embedder = Linear(16, D, rngs=rngs)
    self.transformer_blocks = nnx.List([Block(rngs), Block(rngs)])
    self.proj_out = Linear(D, 16, rngs=rngs)

  def __call__(self, inputs):
    x, temb = inputs
    h = self.x_embedder(x)
    for block in self.transformer_blocks:
      h = block(h, temb)
    return self.proj_out(h)


def _inputs(seed, count):
  keys = jax.random.split(jax.random.key(seed), 2 * count)
  out = []
  for i in range(count):
    x = jax.random.normal(keys[2 * i], (2, 24, 16))
    x = x.at[..., 3].multiply(25.0)  # a channel-wise outlier in the input
    out.append((x, jax.random.normal(keys[2 * i + 1], (2, D))))
  return out


@pytest.fixture(scope="module")
def calibrated():
  model = TinyTransformer(nnx.Rngs(0))
  stats = calibrate(model, _inputs(0, 3), max_samples=32, progress=False)
  return model, stats


def test_calibrate_records_every_linear_by_state_path(calibrated):
  model, stats = calibrated
  assert set(stats) == {
      "x_embedder/kernel", "proj_out/kernel",
      *(f"transformer_blocks/{i}/{name}/kernel" for i in range(2)
        for name in ("norm1/linear", "to_q", "ff/net/0", "ff/net/1"))}
  to_q = stats["transformer_blocks/0/to_q/kernel"]
  assert to_q.samples.shape == (32, D) and to_q.num_tokens == 3 * 2 * 24
  assert stats["transformer_blocks/0/norm1/linear/kernel"].num_tokens == 3 * 2
  x0 = np.asarray(_inputs(0, 3)[0][0]).reshape(-1, 16)
  assert np.all(stats["x_embedder/kernel"].absmax >= np.abs(x0).max(0))
  assert stats["transformer_blocks/0/ff/net/1/kernel"].minimum.min() >= -qz.GELU_SHIFT


def test_quantize_params_selects_skips_and_keeps_the_model_untouched(calibrated):
  model, stats = calibrated
  config = QuantConfig.preset("svdquant-int4", rank=16, svd_iters=2)
  state = nnx.state(model)
  quantized = quantize_params(state, stats, config, progress=False)
  flat = {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(quantized)}
  assert isinstance(flat["x_embedder/kernel"], jax.Array)
  assert isinstance(flat["proj_out/kernel"], jax.Array)
  for i in range(2):
    ada = flat[f"transformer_blocks/{i}/norm1/linear/kernel"]
    assert isinstance(ada, SVDQLinear) and ada.act_format is None and ada.rank == 0
    q = flat[f"transformer_blocks/{i}/to_q/kernel"]
    assert isinstance(q, SVDQLinear) and q.rank == 16 and q.act_shift == 0.0
    down = flat[f"transformer_blocks/{i}/ff/net/1/kernel"]
    assert down.act_shift == qz.GELU_SHIFT and down.bias is not None
    assert isinstance(flat[f"transformer_blocks/{i}/to_q/bias"], jax.Array)  # layer bias stays
  assert isinstance(model.transformer_blocks[0].to_q.kernel.get_value(), jax.Array)
  assert set(selected_kernels(state, config)) == {
      k for k, v in flat.items() if isinstance(v, SVDQLinear)}


def test_quantized_model_runs_under_jit_with_a_small_error(calibrated):
  model, stats = calibrated
  test_inputs = _inputs(1, 1)[0]
  reference = model(test_inputs)
  quantized = nnx.clone(model)
  quantize_model(quantized, stats, QuantConfig.preset("svdquant-int4", rank=16, svd_iters=2),
                 progress=False)
  out = nnx.jit(lambda m, inputs: m(inputs))(quantized, test_inputs)
  error = relative_error(out, reference)
  print(f"tiny transformer, svdquant-int4 r16: relative output error {error:.4f}")
  assert 0 < error < 0.15
  assert model_bytes(nnx.state(quantized)) < 0.6 * model_bytes(nnx.state(model))


def test_plain_dict_params_and_abstract_shapes():
  rng = np.random.default_rng(0)
  params = {"mlp": {"up": {"kernel": jnp.asarray(rng.normal(size=(D, 64)), jnp.float32),
                           "bias": jnp.zeros((64,))}},
            "x_embedder": {"kernel": jnp.ones((D, D))}}
  out = quantize_params(params, None, QuantConfig.preset("w4a4"), progress=False)
  assert isinstance(out["mlp"]["up"]["kernel"], SVDQLinear)
  assert out["x_embedder"]["kernel"] is params["x_embedder"]["kernel"]
  x = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
  y = svdq_dot(x, out["mlp"]["up"]["kernel"], bias=out["mlp"]["up"]["bias"])
  assert relative_error(y, x @ params["mlp"]["up"]["kernel"]) < 0.25
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  abstract = quantize_params(shapes, None, QuantConfig.preset("svdquant-int4"), progress=False)
  assert model_bytes(abstract["mlp"]["up"]["kernel"]) == model_bytes(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                   quantize_params(params, None, QuantConfig.preset("w4a4", rank=32),
                                   progress=False)["mlp"]["up"]["kernel"]))
  bf16 = quantize_params(params, None, QuantConfig.preset("bf16"), progress=False)
  assert bf16["mlp"]["up"]["kernel"].dtype == jnp.bfloat16


def test_calibrate_ignores_calls_without_tokens():
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  x = rng.normal(size=(5, 8)).astype(np.float32)
  stats = calibrate(lambda rows: svdq_dot(jnp.asarray(rows), params["fc"]["kernel"]),
                    [x[:0], x, x[:0]], model=params, progress=False)
  fc = stats["fc/kernel"]
  assert fc.num_tokens == 5
  np.testing.assert_array_equal(fc.absmax, np.abs(x).max(0))
  np.testing.assert_array_equal(fc.minimum, x.min(0))
  np.testing.assert_array_equal(fc.maximum, x.max(0))


def test_calibration_and_selection_errors(calibrated):
  model, stats = calibrated
  with pytest.raises(ValueError, match="under jax.jit"):
    calibrate(lambda inputs: nnx.jit(lambda m, i: m(i))(model, inputs), _inputs(0, 1),
              model=model, progress=False)
  with pytest.raises(ValueError, match="pass model="):
    calibrate(lambda inputs: model(inputs), _inputs(0, 1), progress=False)
  partial = {k: v for k, v in stats.items() if "to_q" not in k}
  with pytest.raises(InputError, match="'transformer_blocks/0/to_q/kernel' has no calibration"):
    quantize_params(nnx.state(model), partial, QuantConfig.preset("w4a4"), progress=False)
  bad = [(jnp.full((2, 24, 16), jnp.nan), jnp.zeros((2, D)))]
  with pytest.raises(InputError, match="'x_embedder/kernel' received NaN"):
    calibrate(model, bad, progress=False)
  state = nnx.state(model)
  nan_params = {"fc": {"kernel": jnp.ones((D, 64)).at[2, 5].set(jnp.inf)}}
  with pytest.raises(InputError, match="'fc/kernel': kernel has 1 NaN or inf"):
    quantize_params(nan_params, None, QuantConfig.preset("w4a4"), progress=False)
  poisoned = dict(stats)
  name = "transformer_blocks/0/to_q/kernel"
  nan_max = np.full_like(stats[name].maximum, np.nan)
  poisoned[name] = dataclasses.replace(stats[name], maximum=nan_max)
  with pytest.raises(InputError, match=f"'{name}': act_absmax has {D} NaN"):
    quantize_params(state, poisoned, QuantConfig.preset("svdquant-int4"), progress=False)


def test_layers_narrower_than_the_group_stay_16_bit_with_one_notice(caplog):
  rng = np.random.default_rng(0)
  params = {"narrow": {"kernel": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)},
            "odd": {"kernel": jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)},
            "wide": {"kernel": jnp.asarray(rng.normal(size=(D, 64)), jnp.float32)}}
  config = QuantConfig.preset("w4a4")
  assert set(selected_kernels(params, config)) == {"wide/kernel"}
  with caplog.at_level(logging.WARNING, logger="svdq_jax"):
    out = quantize_params(params, None, config, progress=False)
  assert out["narrow"]["kernel"] is params["narrow"]["kernel"]
  assert out["odd"]["kernel"] is params["odd"]["kernel"]
  assert isinstance(out["wide"]["kernel"], SVDQLinear)
  notices = [r.getMessage() for r in caplog.records if r.name == "svdq_jax"]
  assert len(notices) == 1, notices
  assert "2 linear layer(s) stay 16-bit" in notices[0] and "group 64" in notices[0]
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  abstract = quantize_params(shapes, None, config, progress=False)
  assert abstract["narrow"]["kernel"] is shapes["narrow"]["kernel"]


class Attention(nnx.Module):
  """q, k, v of different widths on one input (not FLUX's shapes), and an output projection."""

  def __init__(self, rngs):
    self.to_q = Linear(D, D, rngs=rngs)
    self.to_k = Linear(D, 64, rngs=rngs)
    self.to_v = Linear(D, 192, rngs=rngs)
    self.to_out = Linear(D + 64 + 192, D, rngs=rngs)

  def __call__(self, x):
    x = x.at[..., 5].multiply(30.0)  # a channel-wise outlier the smoothing has to handle
    return self.to_out(jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1))


@pytest.mark.parametrize("preset", ["svdquant-int4", "svdquant-nvfp4"])
def test_fused_group_is_one_layer_split_back(preset):
  """QuantConfig.fused: q/k/v quantized as their concatenation (one smoothing factor, one
  lora_down, one tensor scale), each part computing its slice of that layer; to_out alone, its
  INT4 input shift set by QuantConfig.shifted."""
  model = Attention(nnx.Rngs(3))
  inputs = [jax.random.normal(jax.random.key(i), (2, 16, D)) for i in range(2)]
  stats = calibrate(model, inputs, max_samples=32, progress=False)
  config = QuantConfig.preset(preset, rank=16, svd_iters=1, smooth=(0.5,),
                              fused=(("to_q", "to_k", "to_v"), ("to_out", "missing")),
                              shifted=("*to_out/kernel",))
  state = quantize_params(nnx.state(model), stats, config, progress=False)
  q, k, v, out = (state[name]["kernel"].get_value() for name in ("to_q", "to_k", "to_v", "to_out"))
  kernel = jnp.concatenate([model.to_q.kernel.get_value(), model.to_k.kernel.get_value(),
                            model.to_v.kernel.get_value()], axis=1)
  samples = stats["to_q/kernel"]
  whole = svdq_jax.quantize_linear(kernel, None, jnp.asarray(samples.samples), config,
                                   act_absmax=jnp.asarray(samples.absmax),
                                   act_max=jnp.asarray(samples.maximum),
                                   act_min=float(np.min(samples.minimum)))
  x = inputs[0][0]
  want = np.asarray(svdq_dot(x, whole, impl="xla"))
  got = np.concatenate([np.asarray(svdq_dot(x, part, impl="xla")) for part in (q, k, v)], -1)
  np.testing.assert_array_equal(got, want)
  for part in (k, v):
    np.testing.assert_array_equal(np.asarray(part.smooth), np.asarray(q.smooth))
    np.testing.assert_array_equal(np.asarray(part.lora_down), np.asarray(q.lora_down))
    assert float(part.wtscale) == float(q.wtscale)
  assert (q.out_features, k.out_features, v.out_features, out.in_features) == (D, 64, 192, 384)
  # `shifted` forces the INT4 input shift by path, whatever the data (to_out's inputs go negative).
  assert out.act_shift == (qz.GELU_SHIFT if preset == "svdquant-int4" else 0.0)
  assert q.act_shift == 0.0
  separate = quantize_params(nnx.state(model), stats, dataclasses.replace(config, fused=()),
                             progress=False)
  assert not np.array_equal(np.asarray(separate["to_k"]["kernel"].get_value().smooth),
                            np.asarray(q.smooth))
  # to_out has no sibling "missing": quantized alone, as without the group.
  np.testing.assert_array_equal(np.asarray(out.qweight),
                                np.asarray(separate["to_out"]["kernel"].get_value().qweight))


def test_fused_groups_are_checked_and_survive_to_dict():
  config = QuantConfig(fused=[["to_q", "to_k"]])
  assert config.fused == (("to_q", "to_k"),)
  assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  for bad in ((("to_q",),), (("to_q", "to_q"),), (("a/b", "c"),), ("to_q",)):
    with pytest.raises(InputError, match="fused"):
      QuantConfig(fused=bad)
