"""Small PNG figures drawn with Pillow (no plotting library at run time): loss curves, grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def line_plot(points: np.ndarray, *, title: str, size: tuple[int, int] = (480, 320),
              log_y: bool = True) -> Image.Image:
  """(N, 2) (x, y) points as a faint line plus a running mean (1/50 of N), with axis labels."""
  width, height = size
  left, right, top, bottom = 60, 10, 24, 30
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  draw.text((left, 6), title, fill="black")
  draw.rectangle((left, top, width - right, height - bottom), outline="black")
  if len(points) == 0:
    return image
  x, y = points[:, 0], points[:, 1]
  y = np.log10(np.maximum(y, 1e-12)) if log_y else y
  window = max(1, len(y) // 50)
  smooth = np.convolve(y, np.ones(window) / window, mode="valid")
  x0, x1 = float(x.min()), float(max(x.max(), x.min() + 1))
  y0, y1 = float(y.min()), float(max(y.max(), y.min() + 1e-6))

  def to_px(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    px = left + (xs - x0) / (x1 - x0) * (width - left - right)
    py = height - bottom - (ys - y0) / (y1 - y0) * (height - top - bottom)
    return list(zip(px.tolist(), py.tolist(), strict=True))

  draw.line(to_px(x, y), fill=(170, 190, 230), width=1)
  draw.line(to_px(x[window - 1:], smooth), fill=(20, 60, 170), width=2)
  label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
  draw.text((2, top), label(y1), fill="black")
  draw.text((2, height - bottom - 10), label(y0), fill="black")
  draw.text((left, height - bottom + 4), f"{x0:.0f}", fill="black")
  draw.text((width - right - 40, height - bottom + 4), f"{x1:.0f}", fill="black")
  return image


def image_grid(images: np.ndarray, labels: Sequence[str] | None = None, *, columns: int = 8,
               scale: int = 3) -> Image.Image:
  """Images (N, H, W, 3) (uint8, or float in [0, 1]) in a grid, each enlarged `scale` times
  (nearest) with its label underneath."""
  if images.dtype != np.uint8:
    images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
  n, h, w, _ = images.shape
  cell_w, cell_h = max(w * scale, 96), h * scale + (14 if labels is not None else 0)
  rows = -(-n // columns)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, c = divmod(i, columns)
    tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
    canvas.paste(tile, (c * cell_w + (cell_w - w * scale) // 2, r * cell_h))
    if labels is not None:
      draw.text((c * cell_w + 2, r * cell_h + h * scale + 1), labels[i][:16], fill="black")
  return canvas


def labelled_rows(captions: Sequence[Sequence[str]], rows: Sequence[np.ndarray],
                  column_labels: Sequence[str], *, scale: int = 3, caption_width: int = 200
                  ) -> Image.Image:
  """A grid with one row per image batch, each row led by its caption lines and each column
  headed by its label.

  Args:
    captions: the text lines of each row (e.g. a preset and its numbers).
    rows: one batch (N, H, W, 3) per row (uint8, or float in [0, 1]), all of one shape.
    column_labels: N labels, one above each column.
    scale: nearest-neighbour enlargement of each image.
    caption_width: pixels left of the images for the captions.
  """
  if len(captions) != len(rows) or not rows:
    raise ValueError(f"labelled_rows: {len(captions)} captions for {len(rows)} rows")
  shape = rows[0].shape
  if any(r.shape != shape for r in rows) or len(column_labels) != shape[0]:
    raise ValueError(f"labelled_rows: rows of shapes {[r.shape for r in rows]} and "
                     f"{len(column_labels)} column labels; needs one shape (N, H, W, 3), N labels")
  n, h, w, _ = shape
  line = 12
  cell_w = max(w * scale, 96)
  cell_h = max(h * scale, line * max(len(c) for c in captions)) + 4
  header = line + 4
  canvas = Image.new("RGB", (caption_width + n * cell_w, header + len(rows) * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for c, label in enumerate(column_labels):
    draw.text((caption_width + c * cell_w + 2, 2), label[:16], fill="black")
  for r, (lines, images) in enumerate(zip(captions, rows, strict=True)):
    if images.dtype != np.uint8:
      images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    top = header + r * cell_h
    for i, text in enumerate(lines):
      draw.text((4, top + 2 + i * line), text, fill="black")
    for c in range(n):
      tile = Image.fromarray(images[c]).resize((w * scale, h * scale), Image.NEAREST)
      canvas.paste(tile, (caption_width + c * cell_w + (cell_w - w * scale) // 2, top + 2))
  return canvas
