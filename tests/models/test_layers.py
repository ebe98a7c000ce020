"""The shared blocks of `models.layers` and `svdq_jax.config_base` against torch / diffusers /
transformers modules and float64 numpy math (never against our own output)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.loading import load_into, state_paths
from convert.mapping import convert_by_name
from models.layers import (
  ACTIVATIONS,
  Attention,
  Conv2d,
  FeedForward,
  GroupNorm,
  LayerNorm,
  Linear,
  MLPEmbedder,
  RMSNorm,
  attention,
  timestep_embedding,
)
from svdq_jax import QuantConfig, quantize_linear, use_impl
from svdq_jax.config_base import DictConfig

torch = pytest.importorskip("torch")


class _StateDict:
  """A torch module's state dict as a converter tensor source (keys / shape / get as numpy)."""

  def __init__(self, module):
    self.state = {k: v.detach().numpy() for k, v in module.state_dict().items()}

  def keys(self):
    return self.state.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return self.state[key].shape

  def get(self, key: str) -> np.ndarray:
    return self.state[key]


def _from_torch(build, module) -> nnx.Module:
  """Our module built by `build(rngs)` with `module`'s weights (matched by diffusers key)."""
  model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  arrays = convert_by_name(_StateDict(module), state_paths(model), name=type(module).__name__)
  return load_into(model, arrays, source=type(module).__name__)


def _reference_attention(q, k, v, *, mask=None, bias=None, causal=False, scale=None):
  """Softmax attention in float64 numpy on (B, T, H, D) inputs."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.asarray(mask)
  if causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("use_mask, use_bias, causal, scale", [
    (False, False, False, None),
    (True, False, False, None),
    (False, True, False, 1.0),
    (True, True, False, 1.0),
    (True, False, True, None),
    (False, False, True, 0.5),
])
def test_attention_matches_float64_softmax(use_mask, use_bias, causal, scale):
  rng = np.random.default_rng(0)
  b, t, h, d = 2, 5, 3, 8
  q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
  # Padding mask over keys; the first key is always kept so no causal row is empty.
  mask = np.ones((b, 1, 1, t), bool)
  mask[1, ..., 3:] = False
  bias = rng.standard_normal((1, h, t, t)).astype(np.float32)
  mask, bias = (mask if use_mask else None), (bias if use_bias else None)
  ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                   mask=None if mask is None else jnp.asarray(mask),
                   bias=None if bias is None else jnp.asarray(bias), is_causal=causal, scale=scale)
  expected = _reference_attention(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, hf_name", [
    ("relu", "relu"), ("silu", "silu"), ("gelu", "gelu"), ("gelu_new", "gelu_new"),
    ("gelu_tanh", "gelu_pytorch_tanh"), ("quick_gelu", "quick_gelu"),
])
def test_activations_match_transformers(name, hf_name):
  from transformers.activations import ACT2FN

  x = np.linspace(-6.0, 6.0, 97, dtype=np.float32)
  expected = ACT2FN[hf_name](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](jnp.asarray(x))), expected,
                             rtol=1e-5, atol=1e-6)


def test_diffusers_attention_self_and_cross():
  from diffusers.models.attention_processor import Attention as TorchAttention

  torch.manual_seed(0)
  dim, heads, head_dim, kv_dim = 16, 2, 8, 12
  module = TorchAttention(dim, cross_attention_dim=kv_dim, heads=heads, dim_head=head_dim,
                          bias=True).eval()
  ours = _from_torch(lambda rngs: Attention(dim, heads, head_dim, kv_dim=kv_dim, rngs=rngs),
                     module)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, dim)).astype(np.float32)
  context = rng.standard_normal((2, 4, kv_dim)).astype(np.float32)
  keep = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  with torch.no_grad():
    # diffusers takes an additive (B, 1, Tk) mask: 0 to attend, -inf to hide.
    additive = torch.from_numpy(np.where(keep, 0.0, -np.inf).astype(np.float32))[:, None]
    expected = module(torch.from_numpy(x), torch.from_numpy(context),
                      attention_mask=additive).numpy()
  got = ours(jnp.asarray(x), jnp.asarray(context), mask=jnp.asarray(keep)[:, None, None, :])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)

  self_module = TorchAttention(dim, heads=heads, dim_head=head_dim, bias=False).eval()
  self_ours = _from_torch(
      lambda rngs: Attention(dim, heads, head_dim, use_bias=False, rngs=rngs), self_module)
  with torch.no_grad():
    expected = self_module(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(self_ours(jnp.asarray(x))), expected, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_mlp_embedder_matches_diffusers(act):
  from diffusers.models.embeddings import (
      PixArtAlphaTextProjection,
      TimestepEmbedding,
  )

  torch.manual_seed(0)
  if act == "silu":
    module = TimestepEmbedding(24, 16)
  else:
    module = PixArtAlphaTextProjection(24, 16, act_fn="gelu_tanh")
  ours = _from_torch(lambda rngs: MLPEmbedder(24, 16, act=act, rngs=rngs), module.eval())
  x = np.random.default_rng(2).standard_normal((3, 24)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)


def test_mlp_embedder_rejects_unknown_activation():
  with pytest.raises(ValueError, match="'mish' is not one of"):
    MLPEmbedder(4, 4, act="mish", rngs=nnx.Rngs(0))


def test_feed_forward_matches_diffusers():
  from diffusers.models.attention import FeedForward as TorchFeedForward

  torch.manual_seed(0)
  module = TorchFeedForward(16, inner_dim=40, activation_fn="gelu-approximate").eval()
  ours = _from_torch(lambda rngs: FeedForward(16, 40, rngs=rngs), module)
  x = np.random.default_rng(3).standard_normal((2, 5, 16)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)


def test_conv2d_with_converted_oihw_weight_matches_torch():
  torch.manual_seed(0)
  module = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1).eval()
  ours = _from_torch(lambda rngs: Conv2d(3, 5, 3, stride=2, padding=1, rngs=rngs), module)
  x = np.random.default_rng(4).standard_normal((2, 3, 9, 7)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = ours(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim, shift, scale", [(256, 0.0, 1.0), (33, 1.0, 2.0)])
def test_timestep_embedding_matches_diffusers(dim, shift, scale):
  """Odd widths (zero-padded), a frequency shift and a scale, as diffusers' own function."""
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0.0, 1.5, 999.0], np.float32)
  expected = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True,
                                    downscale_freq_shift=shift, scale=scale).numpy()
  got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=True,
                           downscale_freq_shift=shift, scale=scale)
  assert got.shape == (3, dim) and got.dtype == jnp.float32
  # Angles reach 999 * scale rad in float32 on both sides, rounded differently (ulp(1998) is
  # 1.2e-4); measured 4.4e-5.
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1.2e-4)


def test_norms_match_torch_on_bfloat16_input():
  """LayerNorm / RMSNorm / GroupNorm with learned affine parameters, computed in float32 and
  returned in the input's dtype, against torch's float32 norms on the same bf16 values."""
  from diffusers.models.normalization import RMSNorm as TorchRMSNorm

  torch.manual_seed(0)
  x = torch.randn(2, 4, 4, 8).to(torch.bfloat16)
  torch_norms = {
      "layer": torch.nn.LayerNorm(8, eps=1e-5),
      "rms": TorchRMSNorm(8, eps=1e-6),
      "group": torch.nn.GroupNorm(4, 8, eps=1e-6),
  }
  ours = {"layer": LayerNorm(8, eps=1e-5), "rms": RMSNorm(8, eps=1e-6),
          "group": GroupNorm(4, 8, eps=1e-6)}
  for name, module in torch_norms.items():
    with torch.no_grad():
      for p in module.parameters():
        p.copy_(1 + 0.5 * torch.randn(p.shape))
      ours[name].scale.set_value(jnp.asarray(module.weight.numpy()))
      if getattr(module, "bias", None) is not None:
        ours[name].bias.set_value(jnp.asarray(module.bias.numpy()))
      x_torch = x.float().permute(0, 3, 1, 2) if name == "group" else x.float()
      expected = module(x_torch)
      expected = (expected.permute(0, 2, 3, 1) if name == "group" else expected).numpy()
    got = ours[name](jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16, name
    # One bf16 rounding of the output: relative 2**-8.
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=2**-8, atol=1e-6,
                               err_msg=name)


@dataclasses.dataclass(frozen=True)
class _Config(DictConfig):
  width: int = 4
  sizes: tuple[int, ...] = (1, 2)
  name: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "sizes", tuple(self.sizes))


def test_dict_config_round_trips_through_json_types():
  import json

  config = _Config(width=8, sizes=(3, 5, 7), name="x")
  as_dict = config.to_dict()
  assert as_dict == {"width": 8, "sizes": [3, 5, 7], "name": "x"}
  assert _Config.from_dict(json.loads(json.dumps(as_dict))) == config


def test_dict_config_names_unknown_keys():
  with pytest.raises(ValueError, match=r"_Config.from_dict: unknown keys \['depth'\].*"
                                       r"known: \['name', 'sizes', 'width'\]"):
    _Config.from_dict({"width": 2, "depth": 3})


def test_attention_uses_cudnn_only_without_mask_or_bias(monkeypatch):
  """The implementation choice: cuDNN is asked for only where it applies (no mask, no bias)."""
  calls = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kw):
    calls.append(implementation)
    return real(*args, **kw)

  class _Gpu:
    platform = "gpu"

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  monkeypatch.setattr(jax, "devices", lambda: [_Gpu()])
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  attention(q, q, q)
  attention(q, q, q, is_causal=True)
  attention(q, q, q, mask=jnp.ones((1, 1, 1, 4), bool))
  attention(q, q, q, bias=jnp.zeros((1, 2, 4, 4), jnp.bfloat16))
  attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32))
  assert calls == ["cudnn", "cudnn", None, None, None]


def test_linear_passes_its_impl_to_svdq_dot(fake_svdq_kernel):
  """`Linear(impl=...)` picks a quantized kernel's implementation; None follows `use_impl`."""
  device, calls = fake_svdq_kernel
  device.supported = False  # a CPU: "auto" is XLA
  k, n = 64, 32
  kernel = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
  w = quantize_linear(jnp.asarray(kernel), None, None, QuantConfig.preset("w4a4"))
  x = jnp.ones((2, k))

  def quantized_linear(impl):
    layer = Linear(k, n, impl=impl, rngs=nnx.Rngs(0))
    layer.kernel.set_value(w)
    return layer

  for impl, expected_calls in ((None, 0), ("xla", 0), ("pallas-interpret", 1)):
    quantized_linear(impl)(x)
    assert len(calls) == expected_calls, impl
  with use_impl("pallas-interpret"):
    quantized_linear("xla")(x)  # the layer's own choice wins
    assert len(calls) == 1
    quantized_linear(None)(x)
    assert len(calls) == 2
    Linear(k, n, impl="pallas", rngs=nnx.Rngs(0))(x)  # a plain kernel is a matmul under any impl
  assert len(calls) == 2
