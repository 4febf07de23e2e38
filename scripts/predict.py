#!/usr/bin/env python3
"""Classifies image files with an exported SavedModel.

  python scripts/predict.py --export_dir=logs/cifar10/export cat.jpg dog.png

Prints one line per image: ``<path>: <class> <probability>, ...`` with the
--top_k most likely classes. Images of another size are resized to the
model's input size. The exported model needs only TensorFlow; this script
also uses the repo's flag helpers (scripts/cli_common.py), and the resize and
careful file readers of research/data.py: a damaged export or image ends in
one ``error:`` line naming the file (exit 2), and an image whose header claims
more than --max_image_pixels is refused before it is decoded.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)
from research.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("export_dir", None,
                      "A SavedModel written by training or scripts/export.py.",
                      flag_values=fv)
  flags.DEFINE_integer("top_k", 3, "Classes to print per image.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("max_image_pixels", None,
                       "Refuse an image whose header claims more pixels "
                       "(height x width) than this, before decoding it "
                       "(default: research.data.DEFAULT_MAX_IMAGE_PIXELS, "
                       "4096x4096).", lower_bound=1, flag_values=fv)
  flags.mark_flag_as_required("export_dir", flag_values=fv)


_REEXPORT = "re-export it with scripts/export.py"


def load_export(export_dir: str):
  """Loads an export and its serving signature, naming any damaged file.

  Each file is checked before TensorFlow loads the SavedModel, because
  TensorFlow's loader reports a damaged file without saying which one.

  Args:
    export_dir: A SavedModel written by training or scripts/export.py.

  Returns:
    ``(serve, (height, width, channels), class_names)``: the
    ``serving_default`` function, its image shape and the class names.

  Raises:
    UserError: naming the file, if ``saved_model.pb`` or the variables are
      missing, not files, unreadable or damaged, the path is not valid UTF-8,
      or the SavedModel is not an export of this project.
  """
  import tensorflow as tf
  from google.protobuf import message
  from tensorflow.core.protobuf import saved_model_pb2
  from research import checkpoints as checkpoints_lib
  from research import data as data_lib
  shown = data_lib.display_path(export_dir)
  data_lib.require_utf8_path(export_dir, "--export_dir")
  if not os.path.isdir(export_dir):
    raise UserError(f"--export_dir={shown} is not a folder; pass the export "
                    f"folder (<model_dir>/export or scripts/export.py's)")
  pb = os.path.join(export_dir, "saved_model.pb")
  if not os.path.lexists(pb):
    raise UserError(f"--export_dir={shown} holds no SavedModel "
                    f"(saved_model.pb); train a run or use scripts/export.py")
  contents = data_lib.read_file_bytes(pb, what="SavedModel file",
                                      fix=_REEXPORT)
  proto = saved_model_pb2.SavedModel()
  try:
    proto.ParseFromString(contents)
  except message.DecodeError as e:
    raise UserError(f"SavedModel file {data_lib.display_path(pb)} is damaged "
                    f"({data_lib.describe_error(e)}); {_REEXPORT}") from None
  if not proto.meta_graphs:
    raise UserError(f"SavedModel file {data_lib.display_path(pb)} holds no "
                    f"graph (empty or truncated); {_REEXPORT}")
  variables = os.path.join(export_dir, "variables")
  if not os.path.isdir(variables):
    raise UserError(f"export {shown} has no variables/ folder (the "
                    f"weights); {_REEXPORT}")
  checkpoints_lib.check_checkpoint(os.path.join(variables, "variables"),
                                   what="export variables", fix=_REEXPORT)
  try:
    loaded = tf.saved_model.load(export_dir)
  except Exception as e:  # pylint: disable=broad-except
    # The files were read whole above; this is a graph TensorFlow refuses.
    raise UserError(f"cannot load the SavedModel in {shown} "
                    f"({data_lib.describe_error(e)}); {_REEXPORT}") from None
  try:
    serve = loaded.signatures["serving_default"]
    _, height, width, channels = serve.structured_input_signature[1][
        "images"].shape
    names = [n.decode("utf-8") for n in loaded.class_names.numpy()]
    shape = tuple(int(d) for d in (height, width, channels))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise UserError(f"the SavedModel in {shown} is not an export of this "
                    f"project (no serving_default signature taking images "
                    f"[N, H, W, C], or no class_names: "
                    f"{data_lib.describe_error(e)}); {_REEXPORT}") from None
  return serve, shape, names


def load_images(paths, height: int, width: int, channels: int, *,
                max_image_pixels: int | None = None):
  """Reads and decodes image files into one uint8 batch ``[N, H, W, C]``.

  Each header is checked before the image is decoded: an image claiming
  more than ``max_image_pixels`` is refused, not decoded.

  Args:
    paths: Image files (JPEG, PNG, GIF or BMP).
    height: The model's image height; other sizes are resized.
    width: The model's image width.
    channels: The model's channels.
    max_image_pixels: The most pixels an image may claim (default:
      ``research.data.DEFAULT_MAX_IMAGE_PIXELS``).

  Returns:
    The batch.

  Raises:
    UserError: naming the first path that is missing, unreadable, not an
      image or over the pixel limit.
  """
  import tensorflow as tf
  from research import data as data_lib
  limit = max_image_pixels or data_lib.DEFAULT_MAX_IMAGE_PIXELS
  images = []
  for path in paths:
    shown = data_lib.display_path(path)
    if not os.path.lexists(path):
      raise UserError(f"image file not found: {shown}")
    not_image = (f"cannot decode {shown} as an image (JPEG, PNG, GIF or "
                 f"BMP)")
    contents = data_lib.read_file_bytes(
        path, what="image file", fix="pass image files",
        max_bytes=data_lib.max_image_file_bytes(limit))
    try:
      _, claimed_height, claimed_width = data_lib.image_header(contents)
    except ValueError:
      raise UserError(not_image) from None
    data_lib.check_image_size(shown, claimed_height, claimed_width, limit)
    try:
      image = tf.io.decode_image(contents, channels=channels,
                                 expand_animations=False)
    except tf.errors.OpError:
      raise UserError(not_image) from None
    if tuple(image.shape[:2]) != (height, width):
      image = data_lib.resize_uint8(image, (height, width), antialias=True)
    images.append(image)
  return tf.stack(images)


def run(fv: flags.FlagValues, args: list[str]) -> None:
  """Prints the top classes of each image; exits with a status on errors.

  Args:
    fv: This script's parsed flags.
    args: The image paths (the arguments that are not flags).
  """
  paths = args
  if not paths:
    cli.exit_with_error("no images given; usage: predict.py --export_dir=DIR "
                        "IMAGE [IMAGE ...]")
  try:
    serve, (height, width, channels), names = load_export(fv.export_dir)
    images = load_images(paths, height, width, channels,
                         max_image_pixels=fv.max_image_pixels)
  except UserError as e:
    cli.exit_with_error(str(e), status=e.exit_status)
  probabilities = serve(images=images)["probabilities"].numpy()
  k = min(fv.top_k, len(names))
  for path, p in zip(paths, probabilities):
    top = p.argsort()[::-1][:k]
    print(f"{path}: " + ", ".join(f"{names[i]} {p[i]:.3f}" for i in top))


def main(argv):
  run(FLAGS, argv[1:])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
