"""Pictures for TensorBoard's Images tab, drawn with Pillow.

Each returns a uint8 RGBA batch ``[1, H, W, 4]`` for ``tf.summary.image``.
They are drawn after every evaluation, so they are drawn directly (a few
milliseconds each) rather than through a plotting library's figure machinery
(a tenth of a second or more each, and a slower import in every process).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GREEN = (0, 128, 0)
_RED = (200, 0, 0)
_BAR = (31, 119, 180)
_GRAY = (128, 128, 128)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
  left, top, right, bottom = _font(size).getbbox(text)
  return right - left, bottom - top


def _centered(draw: ImageDraw.ImageDraw, x: float, y: float, text: str,
              size: int, fill) -> None:
  """Draws ``text`` centered on ``(x, y)``."""
  draw.text((x, y), text, fill=fill, font=_font(size), anchor="mm")


def _vertical_text(text: str, size: int, fill) -> Image.Image:
  """``text`` rotated to read bottom to top, on a transparent background."""
  width, height = _text_size(text, size)
  image = Image.new("RGBA", (width + 4, height + 6), (0, 0, 0, 0))
  ImageDraw.Draw(image).text((2, 1), text, fill=fill, font=_font(size))
  return image.rotate(90, expand=True)


def _to_array(image: Image.Image) -> np.ndarray:
  return np.asarray(image.convert("RGBA"))[None]


def prediction_grid(images: np.ndarray, labels: Sequence[int],
                    predictions: Sequence[int],
                    class_names: Sequence[str], columns: int = 8
                    ) -> np.ndarray:
  """Images captioned ``true`` over ``predicted``, green if right, red if
  wrong.

  Args:
    images: uint8 ``[k, H, W, C]`` (C is 1 or 3), k >= 1.
    labels: The k true label ids.
    predictions: The k predicted label ids.
    class_names: Name of each label id.
    columns: Images per row.

  Returns:
    uint8 ``[1, height, width, 4]``.
  """
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  k, h, w, _ = images.shape
  scale = max(1, 64 // max(h, w))  # Small images are enlarged, pixelated.
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = h * scale, w * scale
  columns = min(columns, k)
  rows = -(-k // columns)
  size = 11
  cell_w = max(w, max(_text_size(name, size)[0] for name in class_names)) + 8
  cell_h = h + 2 * size + 10
  mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, np.uint8)
  for i in range(k):
    r, c = divmod(i, columns)
    left = c * cell_w + (cell_w - w) // 2
    mosaic[r * cell_h:r * cell_h + h, left:left + w] = images[i]
  canvas = Image.fromarray(mosaic)
  draw = ImageDraw.Draw(canvas)
  for i in range(k):
    r, c = divmod(i, columns)
    color = _GREEN if int(labels[i]) == int(predictions[i]) else _RED
    x, y = c * cell_w + cell_w / 2, r * cell_h + h + 3 + size / 2
    _centered(draw, x, y, class_names[labels[i]], size, color)
    _centered(draw, x, y + size + 2, class_names[predictions[i]], size, color)
  return _to_array(canvas)


def _blues(fraction: float) -> tuple[int, int, int]:
  """White to dark blue, as a heat map's colour for ``fraction`` in [0, 1]."""
  light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])
  return tuple(int(v) for v in light + (dark - light) * fraction)


def confusion_matrix_image(confusion: np.ndarray,
                           class_names: Sequence[str]) -> np.ndarray:
  """The confusion matrix as a heat map, rows normalized, counts written.

  Args:
    confusion: ``[C, C]`` counts, rows true classes, columns predictions.
    class_names: The C class names.

  Returns:
    uint8 ``[1, height, width, 4]``.
  """
  confusion = np.asarray(confusion)
  with np.errstate(invalid="ignore", divide="ignore"):
    fraction = np.nan_to_num(confusion / confusion.sum(axis=1, keepdims=True))
  c = len(class_names)
  size, cell = 11, 34
  names = max(_text_size(name, size)[0] for name in class_names)
  left, top = names + 2 * size + 12, 2 * size + 8
  bottom = names + 2 * size + 12
  canvas = Image.new("RGB", (left + c * cell + 10, top + c * cell + bottom),
                     _WHITE)
  draw = ImageDraw.Draw(canvas)
  _centered(draw, canvas.width / 2, size,
            "confusion matrix (row-normalized colour, counts)", size, _BLACK)
  for i in range(c):
    for j in range(c):
      x, y = left + j * cell, top + i * cell
      draw.rectangle((x, y, x + cell - 1, y + cell - 1),
                     fill=_blues(float(fraction[i, j])))
      _centered(draw, x + cell / 2, y + cell / 2, str(int(confusion[i, j])),
                size - 1, _WHITE if fraction[i, j] > 0.5 else _BLACK)
    draw.text((left - 6, top + i * cell + cell / 2), class_names[i],
              fill=_BLACK, font=_font(size), anchor="rm")
    label = _vertical_text(class_names[i], size, _BLACK)
    canvas.paste(label, (left + i * cell + (cell - label.width) // 2,
                         top + c * cell + 6), label)
  true_label = _vertical_text("true", size, _BLACK)
  canvas.paste(true_label, (2, top + (c * cell - true_label.height) // 2),
               true_label)
  _centered(draw, left + c * cell / 2, canvas.height - size, "predicted",
            size, _BLACK)
  return _to_array(canvas)


def reliability_diagram_image(reliability: dict, ece: float) -> np.ndarray:
  """Accuracy against confidence per bin (``calibration.metrics``), with
  the diagonal a perfectly calibrated model would follow.

  Args:
    reliability: Per bin ``count``, mean ``confidence`` and ``accuracy``
      (NaN for an empty bin).
    ece: The expected calibration error, shown in the title.

  Returns:
    uint8 ``[1, height, width, 4]``.
  """
  counts = np.asarray(reliability["count"])
  accuracy = np.nan_to_num(np.asarray(reliability["accuracy"], float))
  confidence = np.asarray(reliability["confidence"], float)
  bins = len(counts)
  size, plot = 11, 300
  left, top, right, bottom = 48, 30, 12, 44
  canvas = Image.new("RGB", (left + plot + right, top + plot + bottom),
                     _WHITE)
  draw = ImageDraw.Draw(canvas)

  def at(x: float, y: float) -> tuple[float, float]:
    return left + x * plot, top + (1 - y) * plot

  for b in range(bins):
    if counts[b]:
      x0, y0 = at(b / bins, accuracy[b])
      x1, y1 = at((b + 1) / bins, 0)
      draw.rectangle((x0, y0, x1 - 1, y1), fill=_BAR, outline=_BLACK)
  for t in np.linspace(0, 1, 21)[::2]:  # The diagonal, dashed.
    draw.line((*at(t, t), *at(min(t + 0.05, 1), min(t + 0.05, 1))),
              fill=_GRAY, width=1)
  for b in np.flatnonzero(counts):
    x, y = at(confidence[b], confidence[b])
    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=_RED)
  draw.rectangle((*at(0, 1), *at(1, 0)), outline=_BLACK)
  for t in (0.0, 0.5, 1.0):
    x, y = at(t, 0)
    _centered(draw, x, y + size, f"{t:g}", size, _BLACK)
    x, y = at(0, t)
    draw.text((x - 6, y), f"{t:g}", fill=_BLACK, font=_font(size),
              anchor="rm")
  _centered(draw, left + plot / 2, top + plot + 2 * size + 8,
            "confidence (top label); red: mean confidence per bin", size,
            _BLACK)
  accuracy_label = _vertical_text("accuracy", size, _BLACK)
  canvas.paste(accuracy_label, (2, top + (plot - accuracy_label.height) // 2),
               accuracy_label)
  _centered(draw, canvas.width / 2, top / 2,
            f"reliability ({bins} bins), ECE {ece:.4f}", size, _BLACK)
  return _to_array(canvas)
