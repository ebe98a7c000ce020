"""LoRAs in the pipelines (`pipe(..., loras=[(file, strength)])`) against diffusers' pipelines
with the same LoRA file loaded by diffusers / injected by peft; base restored bit for bit,
strengths changed without recompiling, 16-bit layers kept 16-bit, bad files as one-line errors."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import pipelines  # noqa: E402
from svdq_jax import QuantConfig, SVDQLinear, quantize_model  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from svdq_jax.tree import named_leaves  # noqa: E402
from tests.pipelines._pipeline_reference import (  # noqa: E402
  HEIGHT,
  MAX_SEQUENCE_LENGTH,
  WIDTH,
  save_peft_lora,
  save_tiny_flux_pipeline,
  save_tiny_pixart_pipeline,
)

PROMPTS = ["a photo of a red cat", "a big old house by the river"]
KWARGS = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2,
              max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
  """(folder, diffusers pipeline, our pipeline, LoRA file on every linear)."""
  folder = tmp_path_factory.mktemp("flux_lora")
  reference = save_tiny_flux_pipeline(folder / "pipe", heads=4)
  lora, _ = save_peft_lora(reference.transformer, folder / "lora", seed=3)
  return folder, reference, pipelines.FluxPipeline.from_pretrained(folder / "pipe"), lora


def _latents(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, 64, 16)).astype(np.float32)


@pytest.mark.parity
def test_flux_lora_matches_diffusers_and_unloading_restores_the_base(flux):
  _, reference, ours, lora = flux
  latents = _latents()
  base = ours(PROMPTS, latents=latents, **KWARGS)
  reference.load_lora_weights(str(lora), adapter_name="style")
  try:
    for strength in (1.0, 0.5):
      reference.set_adapters(["style"], [strength])
      with torch.no_grad():
        expected = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                             **KWARGS).images
      got = ours(PROMPTS, latents=latents, loras=[(lora, strength)], **KWARGS)
      assert np.abs(got - expected).max() <= 1e-3, strength
      assert np.abs(got - base).max() > 1e-2  # the LoRA is visible
  finally:
    reference.unload_lora_weights()
  np.testing.assert_array_equal(ours(PROMPTS, latents=latents, loras=[], **KWARGS), base)
  np.testing.assert_array_equal(ours(PROMPTS, latents=latents, **KWARGS), base)
  # A float model's LoRA changes values only: one compiled loop (one device, five conditions:
  # no true CFG) served every call above.
  assert ours._runners[("fused", 1, 5)]._cache_size() == 1


@pytest.mark.slow
def test_strengths_change_without_recompiling_on_a_quantized_model(flux):
  """On 4-bit layers a LoRA widens the branch (one new compile); strengths then only change
  values. LoRAs on the 16-bit layers (embedders, final projection) stay 16-bit kernels."""
  folder, _, _, lora = flux
  pipe = pipelines.FluxPipeline.from_pretrained(folder / "pipe", dtype=jnp.bfloat16)
  quantize_model(pipe.transformer, None, QuantConfig.preset(group_size=16, smooth=None,
                                                            svd_iters=1, rank=8), progress=False)
  base_state = nnx.state(pipe.transformer)
  base = pipe(PROMPTS[:1], seed=1, **KWARGS)
  runs = [pipe(PROMPTS[:1], seed=1, loras=[(lora, s)], **KWARGS) for s in (0.5, 1.0)]
  assert pipe._runners[("fused", 1, 5)]._cache_size() == 2  # base shapes, then the LoRA's
  assert np.abs(runs[1] - runs[0]).max() > 1e-3 and np.abs(runs[0] - base).max() > 1e-3
  np.testing.assert_array_equal(pipe(PROMPTS[:1], seed=1, **KWARGS), base)

  merged = dict(named_leaves(pipe._loras.state(pipe.transformer, [(lora, 1.0)])))
  before = dict(named_leaves(base_state))
  for path in ("x_embedder/kernel", "proj_out/kernel", "context_embedder/kernel"):
    assert not isinstance(merged[path], SVDQLinear) and merged[path].dtype == jnp.bfloat16
    assert np.any(np.asarray(merged[path] != before[path]))
  to_q = "transformer_blocks/0/attn/to_q/kernel"
  assert isinstance(merged[to_q], SVDQLinear) and merged[to_q].rank == before[to_q].rank + 4


@pytest.mark.parity
def test_pixart_lora_matches_the_peft_injected_diffusers_pipeline(tmp_path):
  reference = save_tiny_pixart_pipeline(tmp_path / "pipe")
  lora, injected = save_peft_lora(reference.transformer, tmp_path / "lora", seed=5)
  reference.transformer = injected
  ours = pipelines.load_pipeline(tmp_path / "pipe")
  latents = np.random.default_rng(3).standard_normal((2, 4, 16, 16)).astype(np.float32)
  kwargs = dict(KWARGS, guidance_scale=4.5)
  with torch.no_grad():
    expected = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np",
                         use_resolution_binning=False, clean_caption=False, **kwargs).images
  got = ours(PROMPTS, latents=latents, loras=[(lora, 1.0)], **kwargs)
  assert np.abs(got - expected).max() <= 1e-3
  assert np.abs(ours(PROMPTS, latents=latents, **kwargs) - got).max() > 1e-2


def test_bad_loras_are_one_line_input_errors(flux, tmp_path):
  folder, _, ours, lora = flux
  pixart_lora = tmp_path / "pixart.safetensors"
  from safetensors.torch import save_file
  save_file({"transformer.adaln_single.linear.lora_A.weight": torch.zeros(4, 16),
             "transformer.adaln_single.linear.lora_B.weight": torch.zeros(96, 4)}, pixart_lora)
  cases = [
      ([(tmp_path / "missing.safetensors", 1.0)], "missing.safetensors"),
      ([(lora, "strong")], "strength 'strong' is not a finite number"),
      ([(pixart_lora, 1.0)], "match no layer of the flux model .*adaln_single.linear.lora_A"),
      ([lora], "list of \\(file, strength\\) pairs"),
  ]
  for loras, message in cases:
    with pytest.raises(InputError, match=message) as error:
      ours(PROMPTS[:1], loras=loras, **KWARGS)
    assert "\n" not in str(error.value)
  with pytest.raises(InputError, match="jit=True"):
    ours(PROMPTS[:1], loras=[(lora, 1.0)], jit=False, **KWARGS)
