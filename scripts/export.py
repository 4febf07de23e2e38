#!/usr/bin/env python3
"""Exports a training run's checkpoint as a serving SavedModel.

  python scripts/export.py --model_dir=logs/cifar10 [--checkpoint=...] \
      [--export_dir=...]

The SavedModel takes uint8 images [N, H, W, C] and returns class
probabilities and the top class; it loads with tf.saved_model.load, TensorFlow
Serving, keras.layers.TFSMLayer and the TFLite converter. See
research/export.py and BUILD.md ("Serving the export").
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)
from research.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("model_dir", None, "The training run's directory.",
                      flag_values=fv)
  flags.DEFINE_string("checkpoint", None,
                      "Checkpoint path prefix (default: the run's latest), "
                      "e.g. <model_dir>/checkpoints/ckpt-1000.",
                      flag_values=fv)
  flags.DEFINE_string("export_dir", None,
                      "Where to write the SavedModel (default: "
                      "<model_dir>/export; replaced if it exists).",
                      flag_values=fv)
  flags.DEFINE_bool("flip_average", None,
                    "Serve with (or, --noflip_average, without) test-time "
                    "flip averaging (default: as the run evaluates).",
                    flag_values=fv)
  flags.DEFINE_integer("shift_average", None,
                       "Serve with test-time shift averaging by this many "
                       "pixels (0: none; default: as the run evaluates).",
                       lower_bound=0, flag_values=fv)
  flags.mark_flag_as_required("model_dir", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> None:
  """Exports the checkpoint the parsed flags ``fv`` name; exits with a
  status on errors.

  Args:
    fv: This script's parsed flags.
    args: The arguments that are not flags (there must be none).
  """
  cli.refuse_arguments(args)
  from research import data as data_lib
  from research import export as export_lib
  try:
    export_dir = fv.export_dir or os.path.join(fv.model_dir,
                                               export_lib.EXPORT_SUBDIR)
    # Checked first: TensorFlow writes only UTF-8 paths, and would fail
    # after the model was rebuilt.
    data_lib.require_utf8_path(export_dir, "--export_dir")
    # Every file read here (model.json, the state file, the checkpoint)
    # ends, when damaged, in one line naming it.
    model, spec, path = export_lib.load_model_from_run(fv.model_dir,
                                                       fv.checkpoint)
    export_dir = export_lib.export_saved_model(
        model, export_dir, class_names=spec["class_names"],
        image_shape=spec["image_shape"],
        model_config=export_lib.model_config_of(
            spec).with_test_time_augmentation(
                flip_average=fv.flip_average,
                shift_average=fv.shift_average))
  except UserError as e:
    cli.exit_with_error(str(e), status=e.exit_status)
  print(f"exported {path} to {export_dir}")


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # absl's INFO is TF's noise.
  run(FLAGS, argv[1:])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
