"""svdq_jax.lora: LoRAs on the low-rank branch of quantized layers and on plain kernels.

Expected values are numpy float64 products of the LoRA factors (the math `y += s * x @ A @ B`),
added to the output of the unmodified quantized layer.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import QuantConfig, quantize_linear
from svdq_jax.errors import InputError
from svdq_jax.lora import LayerLoRA, apply_loras, linear_shapes
from svdq_jax.qlinear import SVDQLinear, xla_dot

K, N, T = 128, 96, 16
BF16_EPS = 2.0**-8  # relative rounding of a bfloat16 factor (8 significant bits)


@pytest.fixture(scope="module")
def layers():
  """A quantized W4A4 layer (rank 32), a weight-only one (rank 0) and a float one.

  The W4A4 layer is quantized without the (slow) smoothing search, then given random smoothing
  factors: still a valid layer, whose quantized path divides x by them and whose branch does not.
  """
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((K, N)).astype(np.float32) / np.sqrt(K)
  w4a4 = quantize_linear(jnp.asarray(kernel), None, None,
                         QuantConfig.preset(smooth=None, svd_iters=1))
  w4a4 = dataclasses.replace(w4a4, smooth=jnp.asarray(rng.uniform(0.5, 2.0, K), jnp.float32))
  w4a16 = quantize_linear(jnp.asarray(kernel), None, None, QuantConfig.preset("nf4-w4a16"))
  return {"w4a4": {"kernel": w4a4}, "w4a16": {"kernel": w4a16},
          "float": {"kernel": jnp.asarray(kernel, jnp.bfloat16)}}


def _lora(seed: int, rank: int, scale: float = 1.0) -> LayerLoRA:
  rng = np.random.default_rng(seed)
  down = rng.standard_normal((K, rank)).astype(np.float32) / np.sqrt(K)
  up = rng.standard_normal((rank, N)).astype(np.float32) / np.sqrt(rank)
  return LayerLoRA(down, up, scale)


def _inputs() -> np.ndarray:
  return np.random.default_rng(9).standard_normal((T, K)).astype(np.float32)


def _expected_delta(x, loras_and_strengths):
  """sum_i s_i * scale_i * (x @ A_i) @ B_i in float64, and the bound on bfloat16 factors' effect:
  each factor rounded to bf16 moves the product by at most ~2 eps of |x| @ |A| @ |B|."""
  delta = np.zeros((x.shape[0], N))
  bound = np.zeros((x.shape[0], N))
  for lora, s in loras_and_strengths:
    factor = s * lora.scale
    a, b = np.float64(lora.lora_down), np.float64(lora.lora_up)
    delta += factor * (x @ a) @ b
    bound += abs(factor) * (np.abs(x) @ np.abs(a)) @ np.abs(b)
  return delta, 3 * BF16_EPS * bound + 1e-5


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_quantized_layer_output_is_base_plus_float_lora(layers, strength):
  x = _inputs()
  lora = _lora(1, 8, scale=2.0)
  base = layers["w4a4"]
  merged = apply_loras(base, [{"kernel": lora}], [strength])
  assert merged["kernel"].rank == base["kernel"].rank + 8
  got = np.asarray(xla_dot(jnp.asarray(x), merged["kernel"]), np.float64)
  base_out = np.asarray(xla_dot(jnp.asarray(x), base["kernel"]), np.float64)
  delta, bound = _expected_delta(x, [(lora, strength)])
  np.testing.assert_array_less(np.abs(got - (base_out + delta)), bound)
  if strength:
    # The LoRA is visible: the check above is not satisfied by the base output alone.
    assert np.max(np.abs(delta) - bound) > 0


def test_two_loras_with_their_own_strengths(layers):
  x = _inputs()
  a, b = _lora(1, 8, scale=0.5), _lora(2, 16, scale=1.0)
  merged = apply_loras(layers["w4a4"], [{"kernel": a}, {"kernel": b}], jnp.asarray([0.7, -1.3]))
  assert merged["kernel"].rank == layers["w4a4"]["kernel"].rank + 24
  got = np.asarray(xla_dot(jnp.asarray(x), merged["kernel"]), np.float64)
  base_out = np.asarray(xla_dot(jnp.asarray(x), layers["w4a4"]["kernel"]), np.float64)
  delta, bound = _expected_delta(x, [(a, 0.7), (b, -1.3)])
  np.testing.assert_array_less(np.abs(got - (base_out + delta)), bound)


def test_weight_only_layer_takes_the_lora_in_its_dequantized_kernel(layers):
  x = _inputs()
  lora = _lora(3, 4)
  merged = apply_loras(layers["w4a16"], [{"kernel": lora}], [1.0])
  got = np.asarray(xla_dot(jnp.asarray(x), merged["kernel"]), np.float64)
  base_out = np.asarray(xla_dot(jnp.asarray(x), layers["w4a16"]["kernel"]), np.float64)
  delta, bound = _expected_delta(x, [(lora, 1.0)])
  np.testing.assert_array_less(np.abs(got - (base_out + delta)), bound + 1e-2 * np.abs(base_out))


def test_plain_kernel_gets_the_product_in_its_own_dtype(layers):
  lora = _lora(4, 8, scale=0.25)
  kernel = layers["float"]["kernel"]
  merged = apply_loras(layers["float"], [{"kernel": lora}], [2.0])["kernel"]
  assert merged.dtype == jnp.bfloat16
  expected = np.float64(kernel.astype(jnp.float32)) + 0.5 * (
      np.float64(lora.lora_down) @ np.float64(lora.lora_up))
  np.testing.assert_allclose(np.float64(merged.astype(jnp.float32)), expected,
                             rtol=BF16_EPS, atol=1e-6)
  zero = apply_loras(layers["float"], [{"kernel": lora}], [0.0])["kernel"]
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(kernel))


def test_base_parameters_are_untouched_bit_for_bit(layers):
  base = layers["w4a4"]["kernel"]
  before = {k: np.array(v) for k, v in base.arrays().items()}
  apply_loras(layers, [{"w4a4/kernel": _lora(1, 8), "float/kernel": _lora(2, 8)}], [1.0])
  for name, value in base.arrays().items():
    np.testing.assert_array_equal(np.asarray(value), before[name])
  assert layers["w4a4"]["kernel"].rank == 32
  unloaded = apply_loras(layers, [], [])
  for a, b in zip(jax.tree.leaves(unloaded), jax.tree.leaves(layers), strict=True):
    assert a is b


def test_strengths_change_without_recompiling(layers):
  x = jnp.asarray(_inputs())
  adapter = {"kernel": _lora(5, 8)}

  @jax.jit
  def forward(params, adapters, strengths, x):
    return xla_dot(x, apply_loras(params, adapters, strengths)["kernel"])

  outs = [forward(layers["w4a4"], [adapter], jnp.asarray([s]), x) for s in (0.0, 0.5, 1.0)]
  assert forward._cache_size() == 1
  assert not np.array_equal(np.asarray(outs[0]), np.asarray(outs[2]))
  np.testing.assert_allclose(np.asarray(outs[1]) - np.asarray(outs[0]),
                             0.5 * (np.asarray(outs[2]) - np.asarray(outs[0])), atol=2e-2)


def test_nnx_state_of_a_model(layers):
  from flax import nnx

  from models.layers import Linear

  model = Linear(K, N, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  assert linear_shapes(state) == {"kernel": (K, N)}
  merged = apply_loras(state, [{"kernel": _lora(6, 4)}], [1.0])
  assert not np.array_equal(np.asarray(merged["kernel"].get_value()),
                            np.asarray(state["kernel"].get_value()))


def test_bad_inputs(layers):
  with pytest.raises(InputError, match="2 LoRAs need as many strengths, got 1"):
    apply_loras(layers, [{}, {}], [1.0])
  with pytest.raises(InputError, match="not linear layers of the model, first \\['nope/kernel'\\]"):
    apply_loras(layers, [{"nope/kernel": _lora(1, 4)}], [1.0])
  bad = _lora(1, 4)._replace(lora_up=np.zeros((4, N + 1), np.float32))
  with pytest.raises(InputError, match="'w4a4/kernel' is \\(128, 96\\)"):
    apply_loras(layers, [{"w4a4/kernel": bad}], [1.0])
  with pytest.raises(InputError, match="rank 40 .* above the limit 36"):
    apply_loras(layers, [{"w4a4/kernel": _lora(1, 8)}], [1.0], max_rank=36)


def test_svdqlinear_fields_other_than_the_branch_are_shared(layers):
  base = layers["w4a4"]["kernel"]
  merged = apply_loras(layers["w4a4"], [{"kernel": _lora(1, 8)}], [1.0])["kernel"]
  assert isinstance(merged, SVDQLinear)
  for field in ("qweight", "wscales", "wtscale", "smooth", "bias"):
    assert getattr(merged, field) is getattr(base, field)
  assert merged.format == base.format
