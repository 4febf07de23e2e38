"""SavedModel export for serving, and restoring a model from its run.

The export is self-contained: a ``tf.saved_model.load`` in a process without
this package gets a ``serving_default`` signature that takes uint8 images
``images: [N, H, W, C]`` and returns ``probabilities`` (float32 ``[N,
classes]``) and ``top_class`` (int32 ``[N]``), plus the ``class_names``
(a string variable) on the loaded object. Preprocessing (uint8 -> [0, 1]) is
inside the graph, so callers send raw pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Sequence

import tensorflow as tf

from research import data as data_lib
from research import model as model_lib
from research.errors import UserError

EXPORT_SUBDIR = "export"
MODEL_SPEC_FILE = "model.json"


class _Serving(tf.Module):
  """The exported object: the model, its class names, one signature."""

  def __init__(self, model: tf.keras.Model, class_names: Sequence[str],
               image_shape: Sequence[int]):
    super().__init__()
    self.model = model
    self.class_names = tf.Variable(list(class_names), trainable=False,
                                   name="class_names")
    self.serve = tf.function(
        self._serve,
        input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8,
                                        name="images")])

  def _serve(self, images):
    logits = tf.cast(self.model(data_lib.to_float(images), training=False),
                     tf.float32)
    probabilities = tf.nn.softmax(logits, axis=-1)
    return {"probabilities": probabilities,
            "top_class": tf.argmax(probabilities, axis=-1,
                                   output_type=tf.int32)}


def export_saved_model(model: tf.keras.Model, export_dir: str, *,
                       class_names: Sequence[str],
                       image_shape: Sequence[int]) -> str:
  """Writes a serving SavedModel of ``model`` to ``export_dir``, atomically.

  The new export is written next to ``export_dir`` and swapped in by
  renames, so a failed export leaves the previous one intact.

  Args:
    model: A built model returning logits (any strategy: its weights are
      copied into a fresh float32 model outside any strategy).
    export_dir: Target directory (replaced if it exists).
    class_names: One name per output.
    image_shape: ``(H, W, C)`` of the images the model takes.

  Returns:
    ``export_dir``.

  Raises:
    UserError: if the directory cannot be written.
  """
  serving_model = model_lib.build(
      model_lib.ConvNet(num_classes=len(class_names)), image_shape)
  model_lib.copy_weights(model, serving_model)
  module = _Serving(serving_model, class_names, image_shape)
  parent = os.path.dirname(os.path.abspath(export_dir))
  tmp = os.path.join(parent, f".export-tmp-{uuid.uuid4().hex}")
  old = os.path.join(parent, f".export-old-{uuid.uuid4().hex}")
  try:
    os.makedirs(parent, exist_ok=True)
    tf.saved_model.save(module, tmp,
                        signatures={"serving_default": module.serve})
    if os.path.exists(export_dir):
      os.rename(export_dir, old)
    os.rename(tmp, export_dir)
  except (OSError, tf.errors.OpError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(old) and not os.path.exists(export_dir):
      os.rename(old, export_dir)
    raise UserError(f"could not export the model to {export_dir} ({e}); "
                    f"check that the folder is writable and has space"
                    ) from None
  shutil.rmtree(old, ignore_errors=True)
  return export_dir


def model_spec(*, class_names: Sequence[str], image_shape: Sequence[int],
               l2: float) -> dict:
  """What ``model.json`` records so a checkpoint can be rebuilt alone."""
  return {"architecture": "ConvNet", "class_names": list(class_names),
          "image_shape": list(image_shape), "l2": l2}


def load_model_from_run(model_dir: str, checkpoint: str | None = None
                        ) -> tuple[tf.keras.Model, dict, str]:
  """Rebuilds a run's model and restores a checkpoint's weights into it.

  Args:
    model_dir: A training run's directory (with ``model.json`` and
      ``checkpoints/``).
    checkpoint: A checkpoint path prefix; default: the run's latest.

  Returns:
    ``(model, spec, checkpoint_path)``.

  Raises:
    UserError: if the run has no ``model.json`` or no checkpoint, or the
      checkpoint does not fit the model.
  """
  spec_path = os.path.join(model_dir, MODEL_SPEC_FILE)
  try:
    with open(spec_path) as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{spec_path} not found: --model_dir must be a training "
                    f"run's directory") from None
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {spec_path} ({e})") from None
  path = checkpoint or tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints"))
  if not path:
    raise UserError(f"no checkpoint under {model_dir}/checkpoints; train "
                    f"first or pass --checkpoint")
  model = model_lib.build(
      model_lib.ConvNet(num_classes=len(spec["class_names"]),
                        l2=spec.get("l2", 0.0)),
      tuple(spec["image_shape"]))
  try:
    tf.train.Checkpoint(model=model).restore(path).expect_partial(
        ).assert_existing_objects_matched()
  except (tf.errors.OpError, ValueError, AssertionError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e)
    raise UserError(f"cannot restore {path} into the model of "
                    f"{spec_path}: {first}") from None
  return model, spec, path
