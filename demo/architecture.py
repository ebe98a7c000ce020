"""The demo model's components: a FLUX.1-architecture pipeline at 32x32 pixels, small everywhere.

  transformer     models.flux.FluxTransformer: 2 double + 4 single blocks, width 192 (3 heads of
                  64), no guidance embedding (as FLUX.1-schnell); every linear's input width is a
                  multiple of 64 (the quantization group size)
  vae             models.vae.AutoencoderKL: 2 downsamplings (32x32 -> 8x8), FLUX's 16 latent
                  channels, so the transformer sees 4x4 = 16 packed tokens of 64 channels
  text_encoder    models.clip.CLIPTextModel: 2 layers, width 128; its pooled output at <eos>
  text_encoder_2  models.t5.T5Encoder: 2 layers, width 128, gated-gelu
  scheduler       FlowMatchEulerDiscreteScheduler with shift 1 (schnell's)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from demo.tokenizer import EOS_ID, MAX_LENGTH
from models.clip import CLIPTextConfig, CLIPTextModel
from models.flux import FluxConfig, FluxTransformer
from models.t5 import T5Config, T5Encoder
from models.vae import AutoencoderKL, VAEConfig

VOCAB_SIZE = 1024
TEXT_WIDTH = 128
# Channels per GroupNorm group must be > 1: one channel per group (instance norm) erases each
# channel's mean over the image, and with it the colours (a VAE trained so draws all emoji brown).
VAE_NORM_GROUPS = 4


@dataclasses.dataclass(frozen=True)
class DemoConfigs:
  """The configs of the four trained components."""

  transformer: FluxConfig
  vae: VAEConfig
  text_encoder: CLIPTextConfig
  text_encoder_2: T5Config


def demo_configs(*, width: int = 128, double_blocks: int = 2, single_blocks: int = 2,
                 text_width: int = TEXT_WIDTH, text_layers: int = 2, vocab_size: int = VOCAB_SIZE,
                 vae_channels: tuple[int, ...] = (16, 32, 64)) -> DemoConfigs:
  """The demo's configs; the keyword arguments shrink them further for tests."""
  head_dim = 64
  if width % head_dim:
    raise ValueError(f"demo_configs: width {width} must be a multiple of {head_dim}")
  transformer = FluxConfig(
      in_channels=64, num_layers=double_blocks, num_single_layers=single_blocks,
      attention_head_dim=head_dim, num_attention_heads=width // head_dim,
      joint_attention_dim=text_width, pooled_projection_dim=text_width, guidance_embeds=False,
      axes_dims_rope=(8, 28, 28))
  vae = VAEConfig(in_channels=3, out_channels=3, block_out_channels=vae_channels,
                  layers_per_block=1, latent_channels=16, norm_num_groups=VAE_NORM_GROUPS,
                  scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
                  use_post_quant_conv=False, mid_block_add_attention=False)
  clip = CLIPTextConfig(vocab_size=vocab_size, hidden_size=text_width,
                        intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                        num_attention_heads=text_width // 64, max_position_embeddings=MAX_LENGTH,
                        hidden_act="gelu", eos_token_id=EOS_ID)
  t5 = T5Config(vocab_size=vocab_size, d_model=text_width, d_kv=64, d_ff=2 * text_width,
                num_layers=text_layers, num_heads=text_width // 64,
                relative_attention_num_buckets=16, relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu")
  return DemoConfigs(transformer, vae, clip, t5)


def scheduler_config() -> dict:
  """diffusers' FlowMatchEulerDiscreteScheduler config for the demo (static shift 1, schnell)."""
  return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
          "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
          "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential"}


def build_vae(configs: DemoConfigs, seed: int) -> AutoencoderKL:
  """A freshly initialized VAE (float32)."""
  return AutoencoderKL(configs.vae, rngs=nnx.Rngs(seed))


def zero_modulation(transformer: FluxTransformer) -> FluxTransformer:
  """Zeroes the AdaLN modulation linears and the output projection (DiT's adaLN-Zero start:
  every block begins as the identity and the first prediction is zero), in place."""
  for path, module in nnx.iter_modules(transformer):
    zero = (len(path) >= 2 and path[-1] == "linear" and str(path[-2]).startswith("norm")) or (
        tuple(path) == ("proj_out",))
    if zero:
      module.kernel.set_value(jnp.zeros_like(module.kernel.get_value()))
      module.bias.set_value(jnp.zeros_like(module.bias.get_value()))
  return transformer


def build_denoiser(configs: DemoConfigs, seed: int) -> dict[str, nnx.Module]:
  """Freshly initialized transformer (adaLN-Zero) and text encoders (float32), by component."""
  return {
      "transformer": zero_modulation(FluxTransformer(configs.transformer, param_dtype=jnp.float32,
                                                     rngs=nnx.Rngs(seed))),
      "text_encoder": CLIPTextModel(configs.text_encoder, rngs=nnx.Rngs(seed + 1)),
      "text_encoder_2": T5Encoder(configs.text_encoder_2, rngs=nnx.Rngs(seed + 2)),
  }


def parameter_count(module: nnx.Module) -> int:
  """Number of parameters (scalars) of a module."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
