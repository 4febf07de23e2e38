"""Pictures for TensorBoard's Images tab, drawn with matplotlib (Agg).

Each returns a uint8 RGBA batch ``[1, H, W, 4]`` for ``tf.summary.image``.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # No display: render to memory only.
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def _to_array(figure) -> np.ndarray:
  figure.canvas.draw()
  pixels = np.asarray(figure.canvas.buffer_rgba()).copy()
  plt.close(figure)
  return pixels[None]


def prediction_grid(images: np.ndarray, labels: Sequence[int],
                    predictions: Sequence[int],
                    class_names: Sequence[str], columns: int = 8
                    ) -> np.ndarray:
  """Images captioned ``true / predicted``, green if right, red if wrong.

  The images are tiled into one mosaic and drawn in a single axes (one
  subplot per image costs seconds per evaluation).

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
  columns = min(columns, k)
  rows = -(-k // columns)
  caption = h // 2  # Room under each image for its two-line caption.
  cell_h, cell_w = h + caption, w + 4
  mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, np.uint8)
  for i in range(k):
    r, c = divmod(i, columns)
    mosaic[r * cell_h:r * cell_h + h, c * cell_w:c * cell_w + w] = images[i]
  scale = 2.4 / h  # Inches per pixel: a 32-pixel image is 2.4 inches wide.
  figure = plt.figure(figsize=(mosaic.shape[1] * scale,
                               mosaic.shape[0] * scale), dpi=60)
  ax = figure.add_axes((0, 0, 1, 1))
  ax.imshow(mosaic, interpolation="nearest")
  ax.axis("off")
  for i in range(k):
    r, c = divmod(i, columns)
    right = int(labels[i]) == int(predictions[i])
    ax.text(c * cell_w + w / 2, r * cell_h + h + 1,
            f"{class_names[labels[i]]}\n{class_names[predictions[i]]}",
            ha="center", va="top", fontsize=13,
            color="green" if right else "red")
  return _to_array(figure)


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
  size = max(4.0, 0.6 * c + 2)
  figure, ax = plt.subplots(figsize=(size, size), dpi=72)
  # Fixed margins with room for the rotated names: a constrained layout
  # solves for them but costs most of the drawing time at every evaluation.
  margin = min(0.3, 1.1 / size)
  figure.subplots_adjust(left=margin, bottom=margin, right=0.97, top=0.93)
  ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(c), class_names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(c), class_names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(c):
    for j in range(c):
      ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center",
              fontsize=7, color="white" if fraction[i, j] > 0.5 else "black")
  ax.set_title("confusion matrix (row-normalized colour, counts)")
  return _to_array(figure)


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
  edges = np.arange(bins) / bins
  figure, ax = plt.subplots(figsize=(4.5, 4.5), dpi=72)
  figure.subplots_adjust(left=0.15, bottom=0.13, right=0.97, top=0.9)
  ax.bar(edges, accuracy, width=1 / bins, align="edge", color="tab:blue",
         edgecolor="black", linewidth=0.5, label="accuracy")
  filled = counts > 0
  ax.plot(confidence[filled], confidence[filled], "o", color="tab:red",
          markersize=3, label="mean confidence")
  ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence (top label)")
  ax.set_ylabel("accuracy")
  ax.legend(loc="upper left", fontsize=8)
  ax.set_title(f"reliability ({bins} bins), ECE {ece:.4f}")
  return _to_array(figure)
