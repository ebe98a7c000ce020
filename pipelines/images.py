"""Writing generated images as PNGs with their prompt and seed in the text metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from svdq_jax.errors import InputError

PNG_SOFTWARE = "svdq-jax"


def check_png_path(out: str | os.PathLike) -> Path:
  """`out` as a Path, once it ends in .png and its folder exists; InputError else."""
  out = Path(out)
  if out.suffix.lower() != ".png":
    raise InputError(f"output path {str(out)!r} must end in .png")
  if not out.parent.exists():
    raise InputError(f"output folder {str(out.parent)!r} does not exist")
  return out


def save_images(images: np.ndarray, out: str | os.PathLike, *, prompts: Sequence[str],
                seed: int | None, extra: dict[str, str] | None = None) -> list[Path]:
  """Writes (B, H, W, 3) images in [0, 1] as PNGs with prompt and seed in the text metadata.

  One image goes to `out`; several to `<stem>_<index>.png` beside it. Returns the paths.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"save_images: images must be (B, H, W, 3), got {images.shape}")
  if len(prompts) != len(images):
    raise ValueError(f"save_images: {len(images)} images but {len(prompts)} prompts")
  out = Path(out)
  paths = []
  for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
    path = out if len(images) == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")
    info = PngImagePlugin.PngInfo()
    for name, value in {"prompt": prompt, "seed": str(seed), "batch_index": str(index),
                        "software": PNG_SOFTWARE, **(extra or {})}.items():
      info.add_itxt(name, value)
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, pnginfo=info)
    paths.append(path)
  return paths
