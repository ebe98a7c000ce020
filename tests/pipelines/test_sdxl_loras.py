"""SDXL LoRAs in `StableDiffusionXLPipeline(..., loras=...)` against diffusers' pipeline with the
same file loaded by its own `load_lora_weights` (same latents).

The LoRA covers every Linear and Conv2d of the UNet (convs with 3x3 and 1x1 kernels, stride-2
downsampler included) and every attention / MLP linear of both text encoders. The PEFT file is
written by peft (`get_peft_model_state_dict`) and diffusers' `save_lora_weights`; the kohya file
holds the same factors under sd-scripts' SDXL names (the original UNet's `input_blocks` /
`middle_block` / `output_blocks` numbering, `lora_te1_` / `lora_te2_`, one `.alpha` per module),
and diffusers must give the same images from it as from the PEFT file.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pipelines.sdxl import StableDiffusionXLPipeline  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from tests.pipelines._pipeline_reference import (  # noqa: E402  (needs torch, checked above)
  HEIGHT,
  WIDTH,
  save_tiny_sdxl_pipeline,
)

pytestmark = pytest.mark.parity
PROMPTS = ["a photo of a red cat", "a big old house by the river at night with a tree"]
KWARGS = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2)
RANK, ALPHA = 4, 8.0
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# The tiny UNet (`save_tiny_sdxl_pipeline`: 1 layer per block, down blocks [plain, cross-attn],
# up blocks [cross-attn, plain]) in the original UNet's numbering, as sd-scripts names SDXL
# modules: input_blocks.0 = conv_in, then one entry per ResNet layer (ResNet .0, transformer .1)
# and one per downsampler (.0.op); middle_block.{0,1,2}; output_blocks, one per up layer, the
# upsampler after the last layer's transformer (.2.conv).
SGM_BLOCKS = {
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}


def _sgm_name(module: str) -> str:
  for ours, theirs in SGM_BLOCKS.items():
    if module == ours or module.startswith(ours + "."):
      inner = module[len(ours) + 1:]
      if ".resnets." in ours:
        inner = SGM_RESNET[inner]
      return f"{theirs}.{inner}" if inner else theirs
  raise KeyError(module)


def _inject(model: torch.nn.Module, targets: list[str], seed: int
            ) -> tuple[dict[str, torch.Tensor], LoraConfig]:
  """A random, nonzero peft LoRA injected into `model` (in place); its state dict and config."""
  torch.manual_seed(seed)
  config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
  inject_adapter_in_model(config, model)
  with torch.no_grad():  # peft's random init gives large factors; keep the LoRA a perturbation
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.mul_(0.3)
  return get_peft_model_state_dict(model), config


def _kohya(sd: dict[str, torch.Tensor], prefix: str, rename) -> dict[str, torch.Tensor]:
  out = {}
  for key, down in sd.items():
    if not key.endswith(".lora_A.weight"):
      continue
    module = key.removesuffix(".lora_A.weight")
    name = f"{prefix}{rename(module).replace('.', '_')}"
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = sd[f"{module}.lora_B.weight"].contiguous()
    out[f"{name}.alpha"] = torch.tensor(ALPHA)
  return out


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """(diffusers pipeline, our pipeline, {format: LoRA file}, unet LoRA module count)."""
  folder = tmp_path_factory.mktemp("sdxl_lora")
  reference = save_tiny_sdxl_pipeline(folder / "pipe")
  unet = copy.deepcopy(reference.unet)
  layers = sorted(n for n, m in unet.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
  unet_sd, unet_config = _inject(unet, layers, seed=3)
  te_sd, te_config = _inject(copy.deepcopy(reference.text_encoder), TEXT_TARGETS, seed=4)
  te2_sd, te2_config = _inject(copy.deepcopy(reference.text_encoder_2), TEXT_TARGETS, seed=5)
  reference.save_lora_weights(
      folder / "peft", unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
      text_encoder_2_lora_layers=te2_sd, unet_lora_adapter_metadata=unet_config.to_dict(),
      text_encoder_lora_adapter_metadata=te_config.to_dict(),
      text_encoder_2_lora_adapter_metadata=te2_config.to_dict())
  files = {"peft": folder / "peft" / "pytorch_lora_weights.safetensors",
           "kohya": folder / "kohya.safetensors"}

  def text_model(module: str) -> str:
    return module.removeprefix("text_model.")

  kohya = _kohya(unet_sd, "lora_unet_", _sgm_name)
  kohya |= _kohya(te_sd, "lora_te1_text_model_", text_model)
  kohya |= _kohya(te2_sd, "lora_te2_text_model_", text_model)
  save_file(kohya, files["kohya"])
  return reference, StableDiffusionXLPipeline.from_pretrained(folder / "pipe"), files, len(layers)


def _latents(seed: int = 0) -> np.ndarray:
  shape = (len(PROMPTS), 4, HEIGHT // 2, WIDTH // 2)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _reference(pipe, latents: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return pipe(PROMPTS, latents=torch.from_numpy(latents), output_type="np", **KWARGS).images


@pytest.mark.slow
def test_peft_and_kohya_loras_match_diffusers(sdxl):
  """Both files, strengths 0.5 and 1, on the UNet's linears and convs and both text encoders:
  our images equal diffusers' (float models, tight); no LoRA gives the base images back bit for
  bit, and a float model's LoRAs change values only (one compiled loop)."""
  reference, ours, files, unet_layers = sdxl
  latents = _latents()
  base = ours(PROMPTS, latents=latents, **KWARGS)
  expected_base = _reference(reference, latents)
  assert np.abs(base - expected_base).max() <= 1e-3
  expected = {}
  for fmt, file in files.items():
    reference.load_lora_weights(str(file), adapter_name=fmt)
    try:
      # diffusers read every module of the file (the UNet's convs included)
      assert sum("lora_A" in n for n, _ in reference.unet.named_parameters()) == unet_layers
      assert any("lora_A" in n for n, _ in reference.text_encoder_2.named_parameters())
      for strength in (0.5, 1.0):
        reference.set_adapters([fmt], [strength])
        expected[fmt, strength] = _reference(reference, latents)
    finally:
      reference.unload_lora_weights()
    for strength in (0.5, 1.0):
      got = ours(PROMPTS, latents=latents, loras=[(file, strength)], **KWARGS)
      assert np.abs(got - expected[fmt, strength]).max() <= 1e-3, (fmt, strength)
      assert np.abs(got - base).max() > 1e-2, (fmt, strength)  # the LoRA is visible
  for strength in (0.5, 1.0):  # the two files are the same LoRA, for diffusers too
    assert np.abs(expected["peft", strength] - expected["kohya", strength]).max() <= 1e-4
  np.testing.assert_array_equal(ours(PROMPTS, latents=latents, **KWARGS), base)
  assert len(ours._runners[True]) == 1
  assert next(iter(ours._runners[True].values()))._cache_size() == 1


def test_bad_sdxl_loras_are_one_line_input_errors(sdxl, tmp_path):
  _, ours, files, _ = sdxl
  bad = {
      "unknown_block.safetensors": (
          {"lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(4, 32),
           "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(32, 4)},
          "match no layer of the sdxl model .*lora_unet_input_blocks_9_1_proj_in"),
      "conv_shape.safetensors": (
          {"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 1, 1),
           "unet.conv_in.lora_B.weight": torch.zeros(16, 4, 1, 1)},
          r"unet.conv_in.lora_A.weight.*\(4, 4, 1, 1\).*needs \(r, 4, 3, 3\)"),
      "flux.safetensors": (
          {"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
           "transformer.x_embedder.lora_B.weight": torch.zeros(32, 4)},
          "match no layer of the sdxl model .*x_embedder"),
  }
  for name, (tensors, message) in bad.items():
    save_file(tensors, tmp_path / name)
    with pytest.raises(InputError, match=message) as error:
      ours(PROMPTS[:1], loras=[(tmp_path / name, 1.0)], **KWARGS)
    assert "\n" not in str(error.value)
  with pytest.raises(InputError, match="jit=True"):
    ours(PROMPTS[:1], loras=[(files["peft"], 1.0)], jit=False, **KWARGS)
