"""Image-caption data sets for LoRA training: a folder or a JSON list.

  folder/             images (.png, .jpg, .jpeg, .webp) and either
    captions.txt      one line per image: `<file name><TAB><caption>` ('#' starts a comment), or
    <image>.txt       beside each image, its caption (kohya / diffusers DreamBooth style)
  data.json           [{"image": "a.png", "caption": "a red fox"}, ...], image paths relative to
                      the JSON file's folder (or absolute)

Images are read with Pillow, transparent ones composited on white, scaled so that they cover the
training size and centre-cropped to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from svdq_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTIONS_FILE = "captions.txt"


@dataclasses.dataclass(frozen=True)
class Example:
  """One training example: an image file and its caption."""

  image: Path
  caption: str


def _check_caption(caption: object, where: str) -> str:
  if not isinstance(caption, str) or not caption.strip():
    raise InputError(f"{where}: the caption must be non-empty text, got {caption!r}")
  return caption.strip()


def _from_captions_file(folder: Path, file: Path) -> list[Example]:
  examples = []
  for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    name, tab, caption = line.partition("\t")
    if not tab:
      raise InputError(f"{file}:{number}: expected '<image file><TAB><caption>', got {line!r}")
    examples.append(Example(folder / name.strip(), _check_caption(caption, f"{file}:{number}")))
  return examples


def _from_sidecars(folder: Path) -> list[Example]:
  images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  examples = []
  for image in images:
    text = image.with_suffix(".txt")
    if not text.is_file():
      raise InputError(f"{folder}: image {image.name!r} has no caption: add {text.name!r} or a "
                       f"{CAPTIONS_FILE} listing '<image file><TAB><caption>' lines")
    examples.append(Example(image, _check_caption(text.read_text(encoding="utf-8"), str(text))))
  return examples


def _from_json(file: Path) -> list[Example]:
  try:
    entries = json.loads(file.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{file}: not a JSON file ({e})") from e
  if not isinstance(entries, list):
    raise InputError(f"{file}: expected a JSON list of {{\"image\": ..., \"caption\": ...}}")
  examples = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
      raise InputError(f"{file}: entry {i} must be an object with an \"image\" path and a "
                       f"\"caption\", got {entry!r}")
    examples.append(Example(file.parent / entry["image"],
                            _check_caption(entry.get("caption"), f"{file}: entry {i}")))
  return examples


def read_examples(path: str | os.PathLike) -> list[Example]:
  """The examples of a data set (see the module docstring), in file order.

  Raises:
    InputError: a missing path, a malformed captions file or JSON, an image without caption, a
      listed image that does not exist, or no example at all.
  """
  path = Path(path)
  if not path.exists():
    raise InputError(f"training data {str(path)!r} does not exist")
  if path.is_dir():
    captions = path / CAPTIONS_FILE
    examples = _from_captions_file(path, captions) if captions.is_file() else _from_sidecars(path)
  elif path.suffix.lower() == ".json":
    examples = _from_json(path)
  else:
    raise InputError(f"training data {str(path)!r}: expected a folder of images with captions or "
                     "a .json list of {\"image\", \"caption\"}")
  if not examples:
    raise InputError(f"training data {str(path)!r} holds no image")
  for example in examples:
    if not example.image.is_file():
      raise InputError(f"training data {str(path)!r}: image {str(example.image)!r} does not exist")
  return examples


def load_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
  """The image at `path` as (height, width, 3) uint8: composited on white, scaled to cover the
  size (LANCZOS) and centre-cropped.

  Raises:
    InputError when Pillow cannot read it.
  """
  try:
    with Image.open(path) as image:
      image.load()
      rgba = image.convert("RGBA")
  except OSError as e:
    raise InputError(f"image {str(path)!r} cannot be read: {e}") from e
  canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
  scale = max(width / rgb.width, height / rgb.height)
  size = (max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale)))
  rgb = rgb.resize(size, Image.LANCZOS)
  left, top = (size[0] - width) // 2, (size[1] - height) // 2
  return np.asarray(rgb.crop((left, top, left + width, top + height)), np.uint8)
