"""FLUX.1 transformer: parity with diffusers' FluxTransformer2DModel, jit, bf16, eval_shape, errors.

The reference is a tiny random-init diffusers model saved with `save_pretrained`; ours is loaded
from that folder by `FluxTransformer.from_pretrained` (numpy safetensors reader, no torch). The
real-width test builds diffusers' blocks at FLUX.1's width and copies them through our converter's
key table.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.flux import convert_tensors, double_block_keys, single_block_keys
from convert.loading import load_into, state_paths
from models.flux import (
    FluxConfig,
    FluxSingleTransformerBlock,
    FluxTransformer,
    FluxTransformerBlock,
    rope_frequencies,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.models._flux_reference import (  # noqa: E402  (needs torch, checked above)
    TINY,
    make_inputs,
    perturb_,
    reference_forward,
    relative_error,
    save_reference,
)

pytestmark = pytest.mark.parity

TOL = 1e-4  # float32 parity bound (relative to the reference's max |value|)
BF16_TOL = 2e-2  # bfloat16 run against diffusers' bfloat16 run (8 significant bits)

# Tiny configurations: with and without guidance, 2/3/4 heads, different RoPE axis splits, a
# patch size and output width of their own. Values: (diffusers overrides of TINY, input options).
CONFIGS = {
    "dev_2x16_rope4-6-6": ({}, {}),
    "schnell_4x8_rope2-2-4": (
        dict(guidance_embeds=False, num_attention_heads=4, attention_head_dim=8,
             axes_dims_rope=(2, 2, 4), num_layers=1, num_single_layers=2),
        dict(height=3, width=5, text_len=6)),
    "dev_3x24_rope8-8-8_patch2": (
        dict(num_attention_heads=3, attention_head_dim=24, axes_dims_rope=(8, 8, 8),
             patch_size=2, in_channels=12, out_channels=8, joint_attention_dim=20,
             pooled_projection_dim=10, num_layers=1, num_single_layers=1),
        dict(height=5, width=2, text_len=7, text_ids_random=True)),
}


def _jax_inputs(inputs: dict[str, np.ndarray], dtype=jnp.float32) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v, dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(tmp_path, name):
  overrides, input_options = CONFIGS[name]
  reference = save_reference(tmp_path, **overrides)
  inputs = make_inputs(overrides, batch=2, **input_options)
  expected = reference_forward(reference, inputs)

  model = FluxTransformer.from_pretrained(tmp_path)
  out = model(**_jax_inputs(inputs))

  full = {**TINY, **overrides}
  assert model.config.guidance_embeds == full["guidance_embeds"]
  assert out.shape == expected.shape
  assert out.dtype == jnp.float32
  err = relative_error(out, expected)
  print(f"{name}: relative error {err:.2e}")
  assert err <= TOL


def test_jit_forward_matches_diffusers(tmp_path):
  """Two calls of one jitted forward on different inputs of the same shapes: one trace, parity."""
  reference = save_reference(tmp_path)
  model = FluxTransformer.from_pretrained(tmp_path)
  traces = []

  @nnx.jit
  def forward(m, kwargs):
    traces.append(1)
    return m(**kwargs)

  for seed in (1, 7):
    inputs = make_inputs({}, seed=seed)
    assert relative_error(forward(model, _jax_inputs(inputs)),
                          reference_forward(reference, inputs)) <= TOL
  assert len(traces) == 1


def test_bfloat16_run(tmp_path):
  """bf16 parameters and compute, jitted, against diffusers run in bf16 and in float32.

  A bf16 forward is far from the float32 one for both implementations (timestep and guidance are
  rounded to bf16 before the sinusoidal embedding: guidance 3.5 -> 3504), so the bounds are: within
  BF16_TOL of diffusers' own bf16 output, and no more than 1.5x diffusers' bf16 error against
  float32.
  """
  reference = save_reference(tmp_path)
  inputs = make_inputs({})
  expected = reference_forward(reference, inputs)
  expected_bf16 = reference_forward(reference.to(torch.bfloat16), inputs, torch.bfloat16)

  model = FluxTransformer.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  kernel = model.transformer_blocks[0].attn.to_q.kernel[...]
  out = nnx.jit(lambda m, kwargs: m(**kwargs))(model, _jax_inputs(inputs, jnp.bfloat16))

  assert kernel.dtype == jnp.bfloat16
  assert out.dtype == jnp.bfloat16
  err_bf16 = relative_error(out.astype(jnp.float32), expected_bf16)
  err_f32 = relative_error(out.astype(jnp.float32), expected)
  torch_err_f32 = relative_error(expected_bf16, expected)
  print(f"bf16: ours vs diffusers bf16 {err_bf16:.2e}; vs float32: ours {err_f32:.2e}, "
        f"diffusers bf16 {torch_err_f32:.2e}")
  assert err_bf16 <= BF16_TOL
  assert err_f32 <= 1.5 * torch_err_f32


def test_rope_matches_diffusers_at_large_positions():
  """Our float32 angles against diffusers' float64 ones, positions up to 128 (2048 px images)."""
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed

  rng = np.random.default_rng(0)
  ids = np.concatenate([rng.integers(0, 129, (200, 3)), rng.uniform(0, 128, (56, 3))])
  ids = ids.astype(np.float32)
  axes = (16, 56, 56)
  ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(torch.from_numpy(ids))

  cos, sin = rope_frequencies(jnp.asarray(ids), axes)

  # diffusers repeats each pair's angle twice (interleaved); ours keeps one per pair.
  np.testing.assert_allclose(np.repeat(np.asarray(cos), 2, axis=-1), ref_cos.numpy(), atol=2e-5)
  np.testing.assert_allclose(np.repeat(np.asarray(sin), 2, axis=-1), ref_sin.numpy(), atol=2e-5)


def test_eval_shape_full_dev_allocates_nothing():
  """FLUX.1-dev under nnx.eval_shape: shapes only, as many parameters as diffusers' model."""
  model = nnx.eval_shape(lambda: FluxTransformer(FluxConfig.dev(), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model))
  assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)

  with torch.device("meta"):
    reference = diffusers.FluxTransformer2DModel(guidance_embeds=True)
  expected = sum(p.numel() for p in reference.parameters())
  ours = sum(math.prod(s.shape) for s in state_paths(model).values())
  print(f"FLUX.1-dev parameters: {ours:,}")
  assert ours == expected


def test_presets_match_diffusers_defaults():
  defaults = {name: p.default for name, p in
              inspect.signature(diffusers.FluxTransformer2DModel.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
  for preset, guidance in ((FluxConfig.dev(), True), (FluxConfig.schnell(), False)):
    values = preset.to_dict()
    for name, default in defaults.items():
      if name == "guidance_embeds":
        assert values[name] is guidance
      else:
        assert values[name] == (list(default) if isinstance(default, tuple) else default), name
    assert FluxConfig.from_dict(values) == preset


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="must sum to attention_head_dim"):
    FluxConfig(attention_head_dim=64)
  with pytest.raises(ValueError, match="positive even"):
    FluxConfig(attention_head_dim=9, axes_dims_rope=(3, 3, 3))
  with pytest.raises(ValueError, match="unknown fields"):
    FluxConfig.from_dict({"num_layers": 2, "hidden_size": 3})


def test_bad_forward_inputs_raise(tmp_path):
  save_reference(tmp_path)
  model = FluxTransformer.from_pretrained(tmp_path)
  inputs = _jax_inputs(make_inputs({}))
  with pytest.raises(ValueError, match="guidance is required"):
    model(**{k: v for k, v in inputs.items() if k != "guidance"})
  with pytest.raises(ValueError, match=r"img_ids must be \(12, 3\)"):
    model(**{**inputs, "img_ids": inputs["img_ids"][:5]})
  with pytest.raises(ValueError, match=r"txt_ids must be \(8, 3\)"):
    model(**{**inputs, "txt_ids": inputs["txt_ids"][None]})


class _StateDict:
  """A torch state dict seen as a converter tensor source (keys / shape / get as numpy)."""

  def __init__(self, state: dict):
    self.state = state

  def keys(self):
    return self.state.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.state[key].shape)

  def get(self, key: str) -> np.ndarray:
    return self.state[key].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["double", "single"])
def test_real_width_block_parity(kind):
  """One FLUX.1-dev block (hidden 3072, 24 heads of 128, RoPE 16/56/56) on 16 text + 64 image."""
  from diffusers.models.transformers import transformer_flux as flux_torch

  config = FluxConfig.dev()
  torch.manual_seed(0)
  if kind == "double":
    block = flux_torch.FluxTransformerBlock(config.inner_dim, config.num_attention_heads,
                                            config.attention_head_dim)
    table, build = double_block_keys(config), FluxTransformerBlock
  else:
    block = flux_torch.FluxSingleTransformerBlock(config.inner_dim, config.num_attention_heads,
                                                  config.attention_head_dim)
    table, build = single_block_keys(config), FluxSingleTransformerBlock
  block.eval()
  for name, module in block.named_modules():  # q/k norm weights start at 1: make them matter
    if "norm_" in name:
      perturb_(module, seed=len(name), scale=0.2)

  rng = np.random.default_rng(0)
  batch, text_len, grid = 2, 16, 8
  hidden = rng.standard_normal((batch, grid * grid, config.inner_dim)).astype(np.float32)
  context = rng.standard_normal((batch, text_len, config.inner_dim)).astype(np.float32)
  temb = rng.standard_normal((batch, config.inner_dim)).astype(np.float32)
  img_ids = np.stack(np.meshgrid(np.zeros(1), np.arange(grid), np.arange(grid), indexing="ij"),
                     -1).reshape(-1, 3)
  ids = np.concatenate([np.zeros((text_len, 3)), img_ids]).astype(np.float32)
  rotary_torch = flux_torch.FluxPosEmbed(10000, list(config.axes_dims_rope))(torch.tensor(ids))
  with torch.no_grad():
    ref_context, ref_hidden = block(torch.tensor(hidden), torch.tensor(context),
                                    torch.tensor(temb), rotary_torch)

  arrays = convert_tensors(_StateDict(block.state_dict()), table, name=f"{kind} block")
  model = load_into(nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0))), arrays,
                    source=f"{kind} block")
  del block, arrays
  out_context, out_hidden = nnx.jit(lambda m, *a: m(*a))(
      model, jnp.asarray(hidden), jnp.asarray(context), jnp.asarray(temb),
      rope_frequencies(jnp.asarray(ids), config.axes_dims_rope))

  # Compare the blocks' updates (output - input): the residual input would mask their errors.
  errs = (relative_error(out_hidden - hidden, ref_hidden.numpy() - hidden),
          relative_error(out_context - context, ref_context.numpy() - context))
  print(f"{kind} block at width 3072: relative error of the update: image {errs[0]:.2e}, "
        f"text {errs[1]:.2e}")
  assert max(errs) <= TOL


# A FLUX small enough to quantize in seconds, wide enough for INT4 groups of 64 along K.
QUANT_TINY = dict(num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                  joint_attention_dim=64, pooled_projection_dim=32, num_layers=1,
                  num_single_layers=1)
QUANT_TOL = 8e-2  # W4A4 + rank-16 branch vs the float model; measured 4.2e-2 on this model


@pytest.mark.slow
def test_quantized_model_under_jit(tmp_path):
  """quantize_params on a converted FLUX (default skip / weight-only patterns), run under jit.

  Calibrated on two inputs, evaluated on a third. Smoothing grid and SVD refinement are cut down
  (one alpha, two iterations, rank 16) to keep the test short; the layer selection is the default.
  """
  from svdq_jax import QuantConfig, calibrate, is_quantized, quantize_params
  from svdq_jax.tree import named_leaves

  save_reference(tmp_path, **QUANT_TINY)
  model = FluxTransformer.from_pretrained(tmp_path)
  calibration = [_jax_inputs(make_inputs(QUANT_TINY, height=4, width=4, seed=s))
                 for s in (10, 11)]
  held_out = _jax_inputs(make_inputs(QUANT_TINY, height=4, width=4, seed=3))
  config = QuantConfig.preset("svdquant-int4", smooth=(0.5,), svd_iters=2, rank=16)

  stats = calibrate(lambda kwargs: model(**kwargs), calibration, model=model, progress=False)
  graphdef, state = nnx.split(model)
  quantized = nnx.merge(graphdef, quantize_params(state, stats, config, progress=False))
  forward = nnx.jit(lambda m, kwargs: m(**kwargs))
  expected = forward(model, held_out)
  out = forward(quantized, held_out)

  kernels = {p: leaf for p, leaf in named_leaves(nnx.state(quantized)) if p.endswith("kernel")}
  in_blocks = {p for p in kernels if p.startswith(("transformer_blocks", "single_transformer"))}
  assert {p for p, leaf in kernels.items() if is_quantized(leaf)} == in_blocks
  modulation = {p for p in in_blocks if "norm" in p}  # AdaLN linears: W4A16
  assert len(modulation) == 3
  assert all(kernels[p].act_format is None for p in modulation)
  assert all(kernels[p].act_format == "int4" for p in in_blocks - modulation)
  err = relative_error(out, expected)
  print(f"quantized FLUX ({len(in_blocks)} linears): relative error vs float {err:.2e}")
  assert np.all(np.isfinite(np.asarray(out)))
  assert 1e-4 < err <= QUANT_TOL
