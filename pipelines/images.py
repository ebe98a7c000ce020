"""Writing generated images as PNGs with their prompt and seed in the text metadata.

Every PNG is written to a temporary file beside its destination and renamed over it once
complete, so a failure (a full disk, a kill) never leaves a partial PNG under the final name.
"""

from __future__ import annotations

import os
import tempfile
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


def image_path(out: str | os.PathLike, index: int, batch_size: int) -> Path:
  """Where image `index` of a batch of `batch_size` goes: `out` alone, else `<stem>_<index>.png`."""
  out = Path(out)
  return out if batch_size == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")


def write_png_atomic(pixels: np.ndarray, path: Path, info: PngImagePlugin.PngInfo) -> None:
  """Writes (H, W, 3) uint8 `pixels` to `path` through a temporary file and a rename."""
  handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as file:
      Image.fromarray(pixels).save(file, format="PNG", pnginfo=info)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise


def save_images(images: np.ndarray, out: str | os.PathLike, *, prompts: Sequence[str],
                seed: int | None, extra: dict[str, str] | None = None,
                indices: Sequence[int] | None = None, batch_size: int | None = None
                ) -> list[Path]:
  """Writes (B, H, W, 3) images in [0, 1] as PNGs with prompt and seed in the text metadata.

  One image goes to `out`; several to `<stem>_<index>.png` beside it. Each file is complete or
  absent (`write_png_atomic`). Returns the paths.

  indices, batch_size: the images' positions in a larger batch of `batch_size` (default: these
    images are the whole batch), for a process that writes only the rows it owns
    (`models.sharding.process_rows`); the file names and the batch_index metadata use them.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"save_images: images must be (B, H, W, 3), got {images.shape}")
  if len(prompts) != len(images):
    raise ValueError(f"save_images: {len(images)} images but {len(prompts)} prompts")
  indices = list(range(len(images))) if indices is None else list(indices)
  if len(indices) != len(images):
    raise ValueError(f"save_images: {len(images)} images but {len(indices)} indices")
  batch_size = len(images) if batch_size is None else batch_size
  paths = []
  for index, image, prompt in zip(indices, images, prompts, strict=True):
    path = image_path(out, index, batch_size)
    info = PngImagePlugin.PngInfo()
    for name, value in {"prompt": prompt, "seed": str(seed), "batch_index": str(index),
                        "software": PNG_SOFTWARE, **(extra or {})}.items():
      info.add_itxt(name, value)
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    write_png_atomic(pixels, path, info)
    paths.append(path)
  return paths
