"""SavedModel export for serving, and restoring a model from its run.

The export is self-contained and loads in every loader a deployment uses:
``tf.saved_model.load`` (without this package), TensorFlow Serving's graph
loader (``saved_model_cli run``), ``keras.layers.TFSMLayer`` and the TFLite
converter. It holds:

- signature ``serving_default``: uint8 images ``images: [N, H, W, C]`` (RGB,
  the trained size) -> ``probabilities`` (float32 ``[N, classes]``) and
  ``top_class`` (int32 ``[N]``). Preprocessing (uint8 -> [0, 1]) is inside the
  graph, so callers send raw pixels;
- signature ``top_class_names``: class indices ``top_class`` (int32 ``[N]``)
  -> their names ``class_names`` (string ``[N]``), so a serving client can get
  the names from the server that made the prediction;
- ``class_names`` (a string variable) on the object ``tf.saved_model.load``
  returns;
- ``assets.extra/class_names.txt``: the names, one a line in class order, for
  tools that read a label file rather than run a graph.

It is written with ``keras.export.ExportArchive``, not ``tf.saved_model.save``
of a ``tf.Module`` holding the Keras model: that saves a copy of each Keras
variable, which the graph loaders restore, beside the variable the serving
graph reads, which they leave unset (BUILD.md, "Serving the export").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Sequence

import tensorflow as tf

from research import data as data_lib
from research import model as model_lib
from research.config import ModelConfig
from research.errors import UserError

EXPORT_SUBDIR = "export"
MODEL_SPEC_FILE = "model.json"
SERVING_SIGNATURE = "serving_default"
CLASS_NAMES_SIGNATURE = "top_class_names"
# assets.extra/ is SavedModel's folder for files that travel with the model
# but that no graph reads (TF Serving keeps its warm-up requests there).
CLASS_NAMES_FILE = os.path.join("assets.extra", "class_names.txt")


def _fresh_float32_copy(model: tf.keras.Model, model_config: ModelConfig,
                        class_names: Sequence[str],
                        image_shape: Sequence[int]) -> tf.keras.Model:
  """A float32 model built outside any strategy, with ``model``'s weights."""
  fresh = model_lib.create(model_config, num_classes=len(class_names),
                           image_shape=image_shape, dtype="float32")
  model_lib.copy_weights(model, fresh)
  return fresh


def _archive(model: tf.keras.Model, class_names: Sequence[str],
             image_shape: Sequence[int]) -> tf.keras.export.ExportArchive:
  """The export's signatures and class names, ready to be written."""

  def serve(images):
    # training=False: batch norm in inference mode and dropout off, whatever
    # layers the model grows later.
    logits = tf.cast(model(data_lib.to_float(images), training=False),
                     tf.float32)
    probabilities = tf.nn.softmax(logits, axis=-1)
    return {"probabilities": probabilities,
            "top_class": tf.argmax(probabilities, axis=-1,
                                   output_type=tf.int32)}

  names = tf.Variable(list(class_names), trainable=False, name="class_names")

  def top_class_names(top_class):
    return {"class_names": tf.gather(names, top_class)}

  # No archive.track(model): the endpoints' own variables are tracked anyway,
  # and tracking the model would save every weight a second time.
  archive = tf.keras.export.ExportArchive()
  archive.add_endpoint(
      SERVING_SIGNATURE, serve,
      input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8,
                                     name="images")])
  # A signature, not only a variable: TF Serving exposes signatures alone.
  # It takes an input because TF Serving's REST API rejects signatures
  # without one (tensorflow/serving#1676).
  archive.add_endpoint(
      CLASS_NAMES_SIGNATURE, top_class_names,
      input_signature=[tf.TensorSpec([None], tf.int32, name="top_class")])
  # ExportArchive has no public way to put a variable on the loaded object;
  # its root trackable is where add_variable_collection puts collections.
  archive._tf_trackable.class_names = names  # pylint: disable=protected-access
  return archive


def export_saved_model(model: tf.keras.Model, export_dir: str, *,
                       class_names: Sequence[str],
                       image_shape: Sequence[int],
                       model_config: ModelConfig = ModelConfig()) -> str:
  """Writes a serving SavedModel of ``model`` to ``export_dir``, atomically.

  The new export is written next to ``export_dir`` and swapped in by
  renames, so a failed export leaves the previous one intact. Its contents
  are described in this module's docstring.

  Args:
    model: A built model returning logits (any strategy: its weights are
      copied into a fresh float32 model outside any strategy).
    export_dir: Target directory (replaced if it exists).
    class_names: One name per output.
    image_shape: ``(H, W, C)`` of the images the model takes.
    model_config: The registered model ``model`` is (rebuilt to export it).

  Returns:
    ``export_dir``.

  Raises:
    UserError: if the directory cannot be written.
  """
  archive = _archive(
      _fresh_float32_copy(model, model_config, class_names, image_shape),
      class_names, image_shape)
  parent = os.path.dirname(os.path.abspath(export_dir))
  tmp = os.path.join(parent, f".export-tmp-{uuid.uuid4().hex}")
  old = os.path.join(parent, f".export-old-{uuid.uuid4().hex}")
  try:
    os.makedirs(parent, exist_ok=True)
    archive.write_out(tmp, verbose=False)
    names_file = os.path.join(tmp, CLASS_NAMES_FILE)
    os.makedirs(os.path.dirname(names_file), exist_ok=True)
    with open(names_file, "w", encoding="utf-8") as f:
      f.write("".join(f"{name}\n" for name in class_names))
    if os.path.exists(export_dir):
      os.rename(export_dir, old)
    os.rename(tmp, export_dir)
  except (OSError, tf.errors.OpError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(old) and not os.path.exists(export_dir):
      os.rename(old, export_dir)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"could not export the model to {export_dir} ({first}); "
                    f"check that the folder is writable and has space"
                    ) from None
  shutil.rmtree(old, ignore_errors=True)
  return export_dir


def model_spec(*, class_names: Sequence[str], image_shape: Sequence[int],
               model_config: ModelConfig) -> dict:
  """What ``model.json`` records so a checkpoint can be rebuilt alone."""
  return {"model": dataclasses.asdict(model_config),
          "class_names": list(class_names), "image_shape": list(image_shape)}


def model_config_of(spec: dict) -> ModelConfig:
  """The model a ``model.json`` describes (also one written before models
  were registered, which held the ConvNet's ``l2`` alone).

  Raises:
    UserError: if the recorded model configuration is not valid.
  """
  if "model" not in spec:
    return ModelConfig(name="convnet", l2=spec.get("l2", 0.0))
  try:
    return ModelConfig(**spec["model"])
  except (TypeError, ValueError) as e:
    raise UserError(f"{MODEL_SPEC_FILE} holds no valid model ({e})") from None


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
  model = model_lib.create(model_config_of(spec),
                           num_classes=len(spec["class_names"]),
                           image_shape=tuple(spec["image_shape"]))
  try:
    tf.train.Checkpoint(model=model).restore(path).expect_partial(
        ).assert_existing_objects_matched()
  except (tf.errors.OpError, ValueError, AssertionError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e)
    raise UserError(f"cannot restore {path} into the model of "
                    f"{spec_path}: {first}") from None
  return model, spec, path
