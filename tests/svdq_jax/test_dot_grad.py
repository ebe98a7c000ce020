"""Gradients through `svdq_dot`: the straight-through backward pass of a 4-bit layer, the trainable
LoRA branch of a `LoRAKernel`, no gradient for the frozen 4-bit weights, and per-layer memory.

The reference is `jax.grad` of the float function of the dequantized weights,
`x @ w.dequantize() + bias (+ scale * x @ A @ B)`, in float32 jnp: with a loss linear in the
output, the straight-through gradients of the quantized layer must equal it (the output's
cotangent does not depend on the forward's rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import QuantConfig, SVDQLinear, svdq_dot
from svdq_jax import quantizers as qz
from svdq_jax.lora import LoRAKernel, init_lora_factors, with_lora_branches
from svdq_jax.qlinear import expected_shapes

K, N, T, RANK = 128, 96, 16, 4


def random_layer(preset: str, k: int = K, n: int = N, *, rank: int = RANK, shift: float = 0.0,
                 seed: int = 1) -> SVDQLinear:
  """A valid SVDQLinear of random codes, scales, smoothing and branch (quantizing is slow and
  irrelevant to the gradients); `shift` > 0 gives the shifted-activation layer with its bias."""
  config = QuantConfig.preset(preset)
  fmt = config.layer_format(k, shift)
  rng = np.random.default_rng(seed)
  rank = rank if config.rank else 0
  shapes = expected_shapes(fmt, k, n, rank, has_bias=shift > 0)
  values = {
      "qweight": rng.integers(0, 256, shapes["qweight"].shape),
      "wscales": rng.uniform(0.02, 0.05, shapes["wscales"].shape),
      "wtscale": np.asarray(0.5 if fmt.weight_format == "nvfp4" else 1.0),
      "smooth": rng.uniform(0.5, 2.0, k) if fmt.act_format else np.ones(k),
      "lora_down": rng.standard_normal((k, rank)) / np.sqrt(k),
      "lora_up": rng.standard_normal((rank, n)) / np.sqrt(max(rank, 1)),
      "bias": rng.standard_normal(n),
  }
  arrays = {name: jnp.asarray(values[name]).astype(spec.dtype) for name, spec in shapes.items()}
  return SVDQLinear(**{"bias": None, **arrays}, format=fmt, in_features=k, out_features=n)


LAYERS = {
    "svdquant-int4": lambda: random_layer("svdquant-int4"),
    "svdquant-int4-shifted": lambda: random_layer("svdquant-int4", shift=qz.GELU_SHIFT),
    "svdquant-nvfp4": lambda: random_layer("svdquant-nvfp4"),
    "nf4-w4a16": lambda: random_layer("nf4-w4a16"),
}


def _data(seed: int = 2):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, T // 2, K)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, T // 2, N)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(N), jnp.float32)
  return x, cot, bias


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             rtol=rtol, atol=rtol * float(np.max(np.abs(want))))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_straight_through_gradients_equal_the_dequantized_float_reference(name):
  w = LAYERS[name]()
  x, cot, bias = _data()
  kernel = w.dequantize()
  folded = 0.0 if w.bias is None else w.bias

  def ours(x, w, bias):
    return jnp.sum(cot * svdq_dot(x, w, bias=bias, impl="xla"))

  def reference(x, down, up, bias):  # the residual is a constant, the branch is differentiated
    residual = kernel - w.lora_down.astype(jnp.float32) @ w.lora_up.astype(jnp.float32)
    return jnp.sum(cot * (x @ (residual + down @ up) + bias + folded))

  dx, dw, dbias = jax.jit(jax.grad(ours, argnums=(0, 1, 2), allow_int=True))(x, w, bias)
  rx, rdown, rup, rbias = jax.jit(jax.grad(reference, argnums=(0, 1, 2, 3)))(
      x, w.lora_down.astype(jnp.float32), w.lora_up.astype(jnp.float32), bias)
  _close(dx, rx)
  _close(dbias, rbias)
  if w.rank:  # the branch's cotangents come back in its dtype, bfloat16
    _close(dw.lora_down, rdown, rtol=2.0**-7)
    _close(dw.lora_up, rup, rtol=2.0**-7)
  if w.bias is not None:
    _close(dw.bias, rbias)
  # The frozen 4-bit weight and its scales get no gradient.
  assert dw.qweight.dtype == jax.dtypes.float0
  for field in ("wscales", "wtscale", "smooth"):
    assert not np.any(np.asarray(getattr(dw, field), np.float32)), field


def test_lora_kernel_gradients_reach_the_factors_and_the_input():
  w = LAYERS["svdquant-int4"]()
  x, cot, _ = _data(3)
  rng = np.random.default_rng(4)
  down = jnp.asarray(rng.standard_normal((K, RANK)) / np.sqrt(K), jnp.float32)
  up = jnp.asarray(rng.standard_normal((RANK, N)) / np.sqrt(RANK), jnp.float32)
  scale, kernel = 0.5, w.dequantize()

  def ours(x, down, up):
    return jnp.sum(cot * svdq_dot(x, LoRAKernel(w, down, up, scale), impl="xla"))

  def reference(x, down, up):
    return jnp.sum(cot * (x @ kernel + scale * (x @ down) @ up))

  for got, want in zip(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, down, up),
                       jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(x, down, up),
                       strict=True):
    _close(got, want)
  # The branch is added in float32 to the quantized layer's output, unchanged otherwise.
  dot = jax.jit(lambda x, w: svdq_dot(x, w, impl="xla"))
  y = dot(x, LoRAKernel(w, down, up, scale))
  expected = np.float64(dot(x, w)) + scale * np.einsum(
      "btk,kr,rn->btn", np.float64(x), np.float64(down), np.float64(up))
  _close(y, expected)


def test_a_plain_kernel_with_a_lora_branch_differentiates_as_jnp():
  rng = np.random.default_rng(5)
  kernel = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.float32)
  x, cot, bias = _data(6)
  factors = init_lora_factors({"layer/kernel": (K, N)}, RANK, jax.random.key(0))
  factors["layer/kernel"]["lora_up"] = jnp.ones((RANK, N), jnp.float32)
  params = {"layer": {"kernel": kernel, "bias": bias}}

  def ours(factors):
    layer = with_lora_branches(params, factors, 2.0)["layer"]
    return jnp.sum(cot * svdq_dot(x, layer["kernel"], bias=layer["bias"]))

  def reference(factors):
    f = factors["layer/kernel"]
    return jnp.sum(cot * (x @ kernel + bias + 2.0 * (x @ f["lora_down"]) @ f["lora_up"]))

  got, want = jax.jit(jax.grad(ours))(factors), jax.jit(jax.grad(reference))(factors)
  for part in ("lora_down", "lora_up"):
    _close(got["layer/kernel"][part], want["layer/kernel"][part])


def test_init_lora_factors_start_as_the_base_model():
  factors = init_lora_factors({"b/kernel": (64, 8), "a/kernel": (16, 4)}, 3, jax.random.key(0))
  assert factors["a/kernel"]["lora_down"].shape == (16, 3)
  assert not np.any(np.asarray(factors["b/kernel"]["lora_up"]))
  down = np.asarray(factors["b/kernel"]["lora_down"])
  assert np.abs(down).max() <= 1 / 8 and np.abs(down).std() > 0.03  # uniform in +-1/sqrt(64)


@pytest.mark.slow
def test_backward_memory_grows_by_activations_not_by_float_weights():
  """A chain of W4A4 layers: XLA's temporary memory for the gradient grows with the layer count
  by the activations only, far less than one layer's float32 kernel per added layer (a float
  copy of the model would add a whole kernel per layer)."""
  d, tokens = 512, 4
  base = random_layer("svdquant-int4", d, d, rank=32)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((tokens, d)), jnp.float32)

  def temp_bytes(layers: int) -> int:
    chain = [jax.tree.map(jnp.copy, base) for _ in range(layers)]

    def loss(x, chain):
      for w in chain:
        x = jnp.tanh(svdq_dot(x, w, impl="xla"))
      return x.sum()

    compiled = jax.jit(jax.grad(loss)).lower(x, chain).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  kernel_bytes = d * d * 4
  assert temp_bytes(8) - temp_bytes(4) < kernel_bytes  # 4 more layers: less than one kernel
