"""Pictures for TensorBoard's Images tab, drawn with matplotlib (Agg).

Both return a uint8 RGBA batch ``[1, H, W, 4]`` for ``tf.summary.image``.
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
                    class_names: Sequence[str], columns: int = 6
                    ) -> np.ndarray:
  """Images titled ``true / predicted``, green if right, red if wrong.

  Args:
    images: uint8 ``[k, H, W, C]`` (C is 1 or 3).
    labels: The k true label ids.
    predictions: The k predicted label ids.
    class_names: Name of each label id.
    columns: Images per row.

  Returns:
    uint8 ``[1, height, width, 4]``.
  """
  k = len(images)
  rows = max(1, -(-k // columns))
  figure, axes = plt.subplots(rows, columns,
                              figsize=(1.6 * columns, 1.8 * rows),
                              squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= k:
      continue
    image = images[i]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
              cmap="gray" if image.shape[-1] == 1 else None)
    right = int(labels[i]) == int(predictions[i])
    ax.set_title(f"{class_names[labels[i]]}\n{class_names[predictions[i]]}",
                 fontsize=8, color="green" if right else "red")
  figure.suptitle("true / predicted", fontsize=9)
  figure.tight_layout()
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
  figure, ax = plt.subplots(figsize=(size, size))
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
  figure.tight_layout()
  return _to_array(figure)
