#!/usr/bin/env python3
"""Classifies image files with an exported SavedModel.

  python scripts/predict.py --export_dir=logs/cifar10/export cat.jpg dog.png

Prints one line per image: ``<path>: <class> <probability>, ...`` with the
--top_k most likely classes. Images of another size are resized to the
model's input size. The exported model needs only TensorFlow; this script
also uses the repo's flag helpers (scripts/cli_common.py) and the resize of
research/data.py.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("export_dir", None,
                      "A SavedModel written by training or scripts/export.py.",
                      flag_values=fv)
  flags.DEFINE_integer("top_k", 3, "Classes to print per image.",
                       lower_bound=1, flag_values=fv)
  flags.mark_flag_as_required("export_dir", flag_values=fv)


def load_images(paths, height: int, width: int, channels: int):
  """Reads and decodes image files into one uint8 batch ``[N, H, W, C]``.

  Raises:
    ValueError: naming the first path that is missing or not an image.
  """
  import tensorflow as tf
  from research.data import resize_uint8
  images = []
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"image file not found: {path}")
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
    except tf.errors.OpError:
      raise ValueError(f"cannot decode {path} as an image (JPEG, PNG, GIF or "
                       f"BMP)") from None
    if tuple(image.shape[:2]) != (height, width):
      image = resize_uint8(image, (height, width), antialias=True)
    images.append(image)
  return tf.stack(images)


def main(argv):
  paths = argv[1:]
  if not paths:
    cli.exit_with_error("no images given; usage: predict.py --export_dir=DIR "
                        "IMAGE [IMAGE ...]")
  if not os.path.isfile(os.path.join(FLAGS.export_dir, "saved_model.pb")):
    cli.exit_with_error(f"--export_dir={FLAGS.export_dir} holds no "
                        f"SavedModel (saved_model.pb); train a run or use "
                        f"scripts/export.py")
  import tensorflow as tf
  loaded = tf.saved_model.load(FLAGS.export_dir)
  serve = loaded.signatures["serving_default"]
  _, height, width, channels = serve.structured_input_signature[1][
      "images"].shape
  try:
    images = load_images(paths, height, width, channels)
  except ValueError as e:
    cli.exit_with_error(str(e))
  probabilities = serve(images=images)["probabilities"].numpy()
  names = [n.decode() for n in loaded.class_names.numpy()]
  k = min(FLAGS.top_k, len(names))
  for path, p in zip(paths, probabilities):
    top = p.argsort()[::-1][:k]
    print(f"{path}: " + ", ".join(f"{names[i]} {p[i]:.3f}" for i in top))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
