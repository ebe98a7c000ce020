"""Tiny random-init diffusers pipelines saved to a folder: FluxPipeline (transformer, VAE, CLIP,
T5, both tokenizers), PixArtSigmaPipeline and StableDiffusionXLPipeline (UNet, two CLIP
encoders); the reference for the pipeline, CLI and quantization tests.

The tokenizers are built offline with the `tokenizers`-backed transformers classes (a byte-level
BPE for CLIP, a Unigram model for T5) over a small word list, and saved with `save_pretrained`, so
the folder has the layout a real FLUX.1 download has.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from diffusers import (
  AutoencoderKL,
  DPMSolverMultistepScheduler,
  EulerAncestralDiscreteScheduler,
  EulerDiscreteScheduler,
  FlowMatchEulerDiscreteScheduler,
  FluxPipeline,
  FluxTransformer2DModel,
  PixArtSigmaPipeline,
  PixArtTransformer2DModel,
  StableDiffusionXLPipeline,
  UNet2DConditionModel,
)

WORDS = ("a photo of the red blue green cat dog bird sitting on mat in snow under tree with "
         "hat small big old new house river city night day").split()
HEIGHT = WIDTH = 32  # pixels; the VAE halves once, packing halves again: 8 x 8 = 64 tokens
MAX_SEQUENCE_LENGTH = 16  # T5 tokens
CLIP_LENGTH = 12  # CLIP tokens (max_position_embeddings of the tiny CLIP)


def _clip_tokenizer(pad_token: str | None = None) -> transformers.CLIPTokenizer:
  """Byte-level BPE over WORDS: every word merges to one '</w>' token; specials at the end.

  pad_token: a token added to the vocabulary to pad with (SDXL's second tokenizer pads with
  "!"); None pads with the end-of-text token.
  """
  vocab: dict[str, int] = {}
  merges: list[tuple[str, str]] = []
  for ch in sorted({c for w in WORDS for c in w}):
    vocab.setdefault(ch, len(vocab))
    vocab.setdefault(ch + "</w>", len(vocab))
  for word in WORDS:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
      merges.append((pieces[0], pieces[1]))
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      vocab.setdefault(pieces[0], len(vocab))
  merges = list(dict.fromkeys(merges))
  if pad_token is not None:
    vocab.setdefault(pad_token, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  pad = {} if pad_token is None else {"pad_token": pad_token}
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LENGTH,
                                    **pad)


def _t5_tokenizer() -> transformers.T5Tokenizer:
  """Unigram over WORDS ('▁word' pieces plus single characters), pad 0, eos 1, unk 2."""
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
  pieces += [(f"▁{w}", -1.0) for w in WORDS]
  pieces += [(c, -5.0) for c in sorted({c for w in WORDS for c in w})]
  return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _tiny_t5(vocab_size: int) -> transformers.T5EncoderModel:
  """A two-layer T5 encoder of width 32 (eval mode), pad 0, eos 1 as `_t5_tokenizer`."""
  return transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=1)).eval()


def _tiny_vae(**config) -> AutoencoderKL:
  """A two-level 4-latent-channel AutoencoderKL (downsampling by 2); `config` adds options."""
  return AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
      latent_channels=4, norm_num_groups=4, sample_size=HEIGHT, **config)


def _perturb(modules: tuple[torch.nn.Module, ...], scale: float, seed: int) -> None:
  """Adds scale * N(0, 1) noise to every parameter, so that no norm weight is exactly one."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in modules:
      for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator))


def build_tiny_flux_pipeline(*, guidance_embeds: bool = True, heads: int = 2, seed: int = 0
                             ) -> FluxPipeline:
  """The tiny FluxPipeline (float32, eval mode), dev-like (guidance) or schnell-like.

  heads: attention heads of 16 channels; 4 makes the width 64, one INT4 group, for quantization.
  """
  torch.manual_seed(seed)
  tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
  clip_config = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  transformer = FluxTransformer2DModel(
      patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
      num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
      guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
  vae = _tiny_vae(scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False,
                  use_post_quant_conv=False)
  scheduler = FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  pipe = FluxPipeline(
      scheduler=scheduler, vae=vae.eval(),
      text_encoder=transformers.CLIPTextModel(clip_config).eval(), tokenizer=tokenizer,
      text_encoder_2=_tiny_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2,
      transformer=transformer.eval())
  _perturb((transformer, vae), 0.02, seed + 1)
  return pipe


def save_tiny_flux_pipeline(folder: Path, **kwargs) -> FluxPipeline:
  """Builds the tiny pipeline, saves it to `folder` (diffusers layout) and returns it."""
  pipe = build_tiny_flux_pipeline(**kwargs)
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


def save_tiny_pixart_pipeline(folder: Path, *, seed: int = 0) -> PixArtSigmaPipeline:
  """A tiny PixArtSigmaPipeline (T5, 4-channel VAE, DPM-Solver++), saved to `folder`."""
  torch.manual_seed(seed)
  tokenizer = _t5_tokenizer()
  transformer = PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
      cross_attention_dim=16, sample_size=16, patch_size=2, norm_type="ada_norm_single",
      caption_channels=32, use_additional_conditions=False)
  vae = _tiny_vae()
  _perturb((transformer, vae), 0.05, seed + 1)
  pipe = PixArtSigmaPipeline(
      tokenizer=tokenizer, text_encoder=_tiny_t5(len(tokenizer)),
      vae=vae.eval(), transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler())
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


# SDXL's scheduler configs at their released values: base (Euler, leading spacing) and Turbo
# (Euler ancestral, trailing spacing).
SDXL_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      timestep_spacing="leading", steps_offset=1)
SDXL_TURBO_SCHEDULER = dict(SDXL_SCHEDULER, timestep_spacing="trailing")


def save_tiny_sdxl_pipeline(folder: Path, *, turbo: bool = False, force_zeros: bool = True,
                            seed: int = 0, block_out_channels: tuple[int, int] = (16, 32)
                            ) -> StableDiffusionXLPipeline:
  """A tiny StableDiffusionXLPipeline saved to `folder`: CLIP ViT-L-like (quick_gelu) and
  bigG-like (gelu, projection, pad "!") encoders, an SDXL-like UNet (text_time embedding,
  transformer depth 2 at the bottom, the transformers at `block_out_channels[1]` channels with 4
  heads), the 4-channel VAE with SDXL's scaling factor; Euler with SDXL's settings, or Euler
  ancestral with Turbo's (`turbo`)."""
  torch.manual_seed(seed)
  tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")

  def clip_config(tok, **kwargs) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=len(tok), num_hidden_layers=3, max_position_embeddings=CLIP_LENGTH,
        bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=tok.pad_token_id, **kwargs)

  text_encoder = transformers.CLIPTextModel(clip_config(
      tokenizer, hidden_size=32, intermediate_size=37, num_attention_heads=4,
      hidden_act="quick_gelu"))
  text_encoder_2 = transformers.CLIPTextModelWithProjection(clip_config(
      tokenizer_2, hidden_size=40, intermediate_size=64, num_attention_heads=5, hidden_act="gelu",
      projection_dim=20))
  unet = UNet2DConditionModel(
      sample_size=HEIGHT // 2, block_out_channels=block_out_channels, layers_per_block=1,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
      attention_head_dim=(2, 4), cross_attention_dim=32 + 40, use_linear_projection=True,
      addition_embed_type="text_time", addition_time_embed_dim=4,
      projection_class_embeddings_input_dim=20 + 6 * 4, norm_num_groups=8)
  vae = _tiny_vae(scaling_factor=0.13025)
  _perturb((unet, vae), 0.05, seed + 1)
  scheduler = (EulerAncestralDiscreteScheduler(**SDXL_TURBO_SCHEDULER) if turbo
               else EulerDiscreteScheduler(**SDXL_SCHEDULER))
  pipe = StableDiffusionXLPipeline(
      vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
      tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler,
      force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


def save_peft_lora(transformer: torch.nn.Module, folder: Path, *, seed: int, rank: int = 4,
                   alpha: float = 8.0, targets: list[str] | None = None
                   ) -> tuple[Path, torch.nn.Module]:
  """A random (nonzero) peft LoRA on a copy of `transformer` (every linear, or `targets`), saved
  by diffusers' `save_lora_weights` (alpha in the metadata) to folder/pytorch_lora_weights.
  safetensors; returns the file and the copy with the LoRA injected (the reference model)."""
  import copy

  from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

  torch.manual_seed(seed)
  model = copy.deepcopy(transformer)
  if targets is None:
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
  config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
  model = inject_adapter_in_model(config, model)
  with torch.no_grad():  # peft's random init gives large factors; keep the LoRA a perturbation
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.mul_(0.3)
  FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model),
                                 transformer_lora_adapter_metadata=config.to_dict())
  return folder / "pytorch_lora_weights.safetensors", model.eval()
