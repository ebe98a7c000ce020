"""Tiny random-init diffusers FLUX transformers and their inputs: the reference for the FLUX tests.

Shared by tests/models/test_flux.py and tests/convert/test_flux_convert.py. Everything returned is
numpy, so the tests feed the same values to torch and to JAX.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

# A FLUX transformer small enough to run in milliseconds: 2 heads of 16, RoPE axes (4, 6, 6).
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
  """Adds `scale * N(0, 1)` noise to every parameter in place.

  The RMS norm weights start at exactly one; perturbing them makes a norm that ignores its scale
  (or a scale loaded into the wrong norm) visible in the comparison.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def save_reference(folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **overrides) -> FluxTransformer2DModel:
  """A tiny random-init `FluxTransformer2DModel` (TINY updated by `overrides`) saved to `folder`."""
  torch.manual_seed(seed)
  model = FluxTransformer2DModel(**{**TINY, **overrides}).eval()
  perturb_(model, seed + 1)
  model = model.to(dtype)
  model.save_pretrained(folder)
  return model


def image_ids(height: int, width: int) -> np.ndarray:
  """(height * width, 3) float32 ids as the FLUX pipeline builds them: (0, row, column)."""
  ids = np.zeros((height, width, 3), np.float32)
  ids[..., 1] = np.arange(height)[:, None]
  ids[..., 2] = np.arange(width)[None, :]
  return ids.reshape(-1, 3)


def make_inputs(config: dict, *, batch: int = 2, height: int = 4, width: int = 3,
                text_len: int = 8, text_ids_random: bool = False,
                seed: int = 1) -> dict[str, np.ndarray]:
  """Forward inputs (diffusers argument names) for a model built with `config` (a kwargs dict).

  Timesteps and guidance differ per batch element; `txt_ids` are zeros (as in FLUX.1) unless
  `text_ids_random`, which exercises every RoPE axis of the text tokens too.
  """
  rng = np.random.default_rng(seed)
  full = {**TINY, **config}
  inputs = {
      "hidden_states": rng.standard_normal((batch, height * width, full["in_channels"])),
      "encoder_hidden_states": rng.standard_normal((batch, text_len,
                                                    full["joint_attention_dim"])),
      "pooled_projections": rng.standard_normal((batch, full["pooled_projection_dim"])),
      "timestep": rng.uniform(0.05, 1.0, batch),
      "img_ids": image_ids(height, width),
      "txt_ids": (rng.integers(0, 5, (text_len, 3)) if text_ids_random
                  else np.zeros((text_len, 3))),
  }
  if full["guidance_embeds"]:
    inputs["guidance"] = rng.uniform(1.0, 5.0, batch)
  return {k: v.astype(np.float32) for k, v in inputs.items()}


def reference_forward(model: FluxTransformer2DModel, inputs: dict[str, np.ndarray],
                      dtype: torch.dtype = torch.float32) -> np.ndarray:
  """diffusers' output on `inputs` (cast to `dtype`), as float32 numpy."""
  tensors = {k: torch.from_numpy(v).to(dtype) for k, v in inputs.items()}
  with torch.no_grad():
    return model(**tensors, return_dict=False)[0].float().numpy()


def relative_error(ours, reference) -> float:
  """max |ours - reference| / max |reference|, in float64."""
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())
