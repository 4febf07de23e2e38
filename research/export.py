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

import ctypes
import dataclasses
import errno
import glob
import json
import logging
import os
import shutil
import sys
import uuid
from typing import Sequence

import tensorflow as tf

from research import checkpoints as checkpoints_lib
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
             image_shape: Sequence[int], model_config: ModelConfig
             ) -> tf.keras.export.ExportArchive:
  """The export's signatures and class names, ready to be written."""

  def serve(images):
    # The evaluation's own logits: inference mode, and the test-time
    # averages the model was evaluated with.
    logits = model_lib.inference_logits(
        model, data_lib.to_float(images),
        **model_config.test_time_augmentation)
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

  The new export is written next to ``export_dir`` and swapped in whole
  (``_publish``), so a failed or killed export leaves the previous one
  intact. Its contents
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
      class_names, image_shape, model_config)
  recover_interrupted_export(export_dir)
  tmp = _sibling(export_dir, "tmp")
  try:
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    archive.write_out(tmp, verbose=False)
    names_file = os.path.join(tmp, CLASS_NAMES_FILE)
    os.makedirs(os.path.dirname(names_file), exist_ok=True)
    with open(names_file, "w", encoding="utf-8") as f:
      f.write("".join(f"{name}\n" for name in class_names))
    _publish(tmp, export_dir)
  except (OSError, tf.errors.OpError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f"could not export the model to {export_dir} "
                    f"({data_lib.describe_error(e)}); "
                    f"check that the folder is writable and has space"
                    ) from None
  return export_dir


# Linux's renameat2 flag that swaps two paths in one step.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
  """Swaps two existing directories atomically (Linux ``renameat2`` with
  ``RENAME_EXCHANGE``).

  Returns:
    False where the system or its filesystem cannot (then nothing moved).

  Raises:
    OSError: if the swap was possible but failed.
  """
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None, use_errno=True)
  renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28.
  if renameat2 is None:
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
               _RENAME_EXCHANGE) == 0:
    return True
  error = ctypes.get_errno()
  if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False  # An old kernel, or a filesystem without the flag.
  raise OSError(error, os.strerror(error), a)


def _sibling(export_dir: str, kind: str) -> str:
  """A fresh name beside ``export_dir`` for its new (``tmp``) or replaced
  (``old``) version: hidden, and specific to this export's name."""
  parent, name = os.path.split(os.path.abspath(export_dir))
  return os.path.join(parent, f".{name}.{kind}-{uuid.uuid4().hex}")


def _siblings(export_dir: str, kind: str) -> list[str]:
  parent, name = os.path.split(os.path.abspath(export_dir))
  return sorted(glob.glob(os.path.join(glob.escape(parent),
                                       f".{glob.escape(name)}.{kind}-*")))


def _publish(tmp: str, export_dir: str) -> None:
  """Makes the complete export in ``tmp`` the one at ``export_dir``.

  A reader, or a crash at any instant, sees either the previous export whole
  or the new one whole: on Linux the two are swapped in one step. Elsewhere
  the previous one is first moved aside, and a crash between the two
  renames leaves it there, under ``.<name>.old-*``, from where
  ``recover_interrupted_export`` (the next export or run) puts it back.
  """
  if not os.path.lexists(export_dir):
    os.rename(tmp, export_dir)
  elif _exchange(tmp, export_dir):
    shutil.rmtree(tmp, ignore_errors=True)  # Now the previous export.
  else:
    old = _sibling(export_dir, "old")
    os.rename(export_dir, old)
    try:
      os.rename(tmp, export_dir)
    except OSError:
      os.rename(old, export_dir)
      raise
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_export(export_dir: str) -> None:
  """Repairs what an export killed half-way left beside ``export_dir``.

  Puts back the previous export if a kill came between the two renames of
  ``_publish``'s fallback, and removes unfinished new versions. Only the one
  writer of ``export_dir`` may call it (a training run holds its run lock).
  """
  old = _siblings(export_dir, "old")  # At most one: each export recovers.
  if old and not os.path.lexists(export_dir):
    os.rename(old[0], export_dir)
    logging.warning("put back the export %s that an interrupted export had "
                    "moved aside", export_dir)
  for leftover in _siblings(export_dir, "old") + _siblings(export_dir, "tmp"):
    shutil.rmtree(leftover, ignore_errors=True)


def model_spec(*, class_names: Sequence[str], image_shape: Sequence[int],
               model_config: ModelConfig, averaged_weights: bool = False
               ) -> dict:
  """What ``model.json`` records so a checkpoint can be rebuilt alone.

  ``averaged_weights``: the run keeps an EMA of the weights, which is what
  an export of its checkpoints holds.
  """
  return {"model": dataclasses.asdict(model_config),
          "class_names": list(class_names), "image_shape": list(image_shape),
          "averaged_weights": averaged_weights}


def model_config_of(spec: dict) -> ModelConfig:
  """The model a ``model.json`` describes (also one written before models
  were registered, which held the ConvNet's ``l2`` alone).

  Args:
    spec: The parsed ``model.json``.

  Returns:
    The model's configuration.

  Raises:
    UserError: if the recorded model configuration is not valid.
  """
  if not isinstance(spec, dict):
    raise UserError(f"{MODEL_SPEC_FILE} holds no JSON object; re-create it "
                    f"(scripts/train_loop.py writes it)")
  fields = spec.get("model", {"name": "convnet", "l2": spec.get("l2", 0.0)})
  if not isinstance(fields, dict):
    raise UserError(f"{MODEL_SPEC_FILE} holds no valid model ('model' is not "
                    f"an object)")
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  for name, value in fields.items():
    default = defaults.get(name)
    # A crafted or damaged file must fail here, not deep inside the model
    # code: each value must have its field's type (ints count as floats).
    if isinstance(default, (str, int, float)) and not (
        type(value) is type(default) or
        (isinstance(default, float) and type(value) is int)):
      raise UserError(f"{MODEL_SPEC_FILE} holds no valid model (model.{name} "
                      f"is {value!r}, not a {type(default).__name__})")
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"{MODEL_SPEC_FILE} holds no valid model ({e})") from None


def _found(directory: str) -> str:
  """``" (found: ckpt-4, ckpt-8)"``, for messages that ask for a prefix."""
  names = [data_lib.display_path(os.path.basename(p))
           for p in checkpoints_lib.checkpoints_in(directory)]
  return f" (found: {', '.join(names)})" if names else ""


def latest_checkpoint(directory: str, *, first: str = "train first") -> str:
  """The checkpoint the state file of ``directory`` (a run's
  ``checkpoints/``, or its ``best/``) names.

  Args:
    directory: A folder of checkpoints.
    first: What to do first when there is none (in the message).

  Raises:
    UserError: naming the state file, if it is missing, unreadable, damaged
      or names a checkpoint that does not exist.
  """
  shown = data_lib.display_path(
      os.path.join(directory, checkpoints_lib.STATE_FILE))
  fix = (f"pass --checkpoint={data_lib.display_path(directory)}/ckpt-N"
         f"{_found(directory)}")
  parsed = checkpoints_lib.read_state(directory, fix=fix)
  if parsed is None:
    raise UserError(f"no checkpoint under {data_lib.display_path(directory)} "
                    f"(no state file {shown}); {first} or {fix}")
  path = parsed.model_checkpoint_path
  if not os.path.lexists(path + ".index"):
    name = data_lib.display_path(os.path.basename(path))
    raise UserError(f"checkpoint state file {shown} names {name}, but "
                    f"{name}.index does not exist; {fix}")
  return path


def _spec_fields(spec, spec_path: str) -> tuple[list[str], tuple[int, ...]]:
  """``model.json``'s class names and image shape, checked."""
  shown = data_lib.display_path(spec_path)
  names = spec.get("class_names") if isinstance(spec, dict) else None
  shape = spec.get("image_shape") if isinstance(spec, dict) else None
  if (not isinstance(names, list) or not names or
      not all(isinstance(n, str) for n in names)):
    raise UserError(f"{shown} holds no list of class_names; re-create it "
                    f"(scripts/train_loop.py writes it)")
  if (not isinstance(shape, list) or len(shape) != 3 or
      not all(type(d) is int and d > 0 for d in shape)):
    raise UserError(f"{shown}: image_shape is {shape!r}, not [height, width, "
                    f"channels]; re-create it (scripts/train_loop.py writes "
                    f"it)")
  return names, tuple(shape)


def load_model_from_run(model_dir: str, checkpoint: str | None = None
                        ) -> tuple[tf.keras.Model, dict, str]:
  """Rebuilds a run's model and restores a checkpoint's weights into it:
  the moving averages of the trainable weights when the run keeps them
  (``model.json``'s ``averaged_weights``), the trained weights otherwise.

  Args:
    model_dir: A training run's directory (with ``model.json`` and
      ``checkpoints/``).
    checkpoint: A checkpoint path prefix; default: the one the run's
      ``checkpoints/checkpoint`` state file names (its latest).

  Returns:
    ``(model, spec, checkpoint_path)``.

  Raises:
    UserError: naming the file, if ``model.json``, the state file or a file
      of the checkpoint is missing, unreadable, damaged or not valid, or the
      checkpoint does not fit the model.
  """
  spec_path = os.path.join(model_dir, MODEL_SPEC_FILE)
  shown = data_lib.display_path(spec_path)
  fix = "re-create it (scripts/train_loop.py writes it)"
  if not os.path.lexists(spec_path):
    raise UserError(f"{shown} not found: --model_dir must be a training "
                    f"run's directory")
  raw = data_lib.read_file_bytes(spec_path, what="model spec", fix=fix,
                                 max_bytes=16 << 20)
  try:
    spec = json.loads(raw.decode("utf-8"))
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError.
    raise UserError(f"cannot read {shown} ({data_lib.describe_error(e)}); "
                    f"{fix}") from None
  class_names, image_shape = _spec_fields(spec, spec_path)
  model_config = model_config_of(spec)
  path = checkpoint or latest_checkpoint(
      os.path.join(model_dir, checkpoints_lib.CHECKPOINTS_SUBDIR))
  # A folder passed as --checkpoint: list the prefixes in it.
  near = path if os.path.isdir(path) else os.path.dirname(path) or "."
  checkpoints_lib.check_checkpoint(
      path, fix="pass another --checkpoint=<model_dir>/checkpoints/ckpt-N"
      f"{_found(near)}")
  try:
    model = model_lib.create(model_config, num_classes=len(class_names),
                             image_shape=image_shape)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # An image_shape too small for the network, or too big for memory.
    raise UserError(f"cannot build the model {shown} describes "
                    f"({data_lib.describe_error(e)}); {fix}") from None
  try:
    tf.train.Checkpoint(model=model).restore(path).expect_partial(
        ).assert_existing_objects_matched()
    if spec.get("averaged_weights"):
      tf.train.Checkpoint(averaged_weights=model.trainable_variables).restore(
          path).expect_partial().assert_existing_objects_matched()
  except Exception as e:  # pylint: disable=broad-except
    # The files were read whole above; what fails here is the fit (a
    # checkpoint of another model: ValueError, AssertionError, OpError).
    raise UserError(f"cannot restore {data_lib.display_path(path)} into the "
                    f"model of {shown}: {data_lib.describe_error(e)}"
                    ) from None
  return model, spec, path
