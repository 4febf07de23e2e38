"""What the entry-point scripts share: flag parsing, validation, error exits.

This is the only place, with the scripts themselves, that reads absl flags;
the ``research`` library takes plain arguments.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile

from absl import flags

from research import options
from research.errors import UserError

# Room for a few checkpoints (1.5 MB each) and event files.
MIN_FREE_MB = 20


def exit_with_error(message: str, status: int = 2) -> None:
  """Prints ``error: <message>`` as one line on stderr and exits."""
  one_line = " ".join(str(message).split())
  sys.stderr.write(f"error: {one_line}\n")
  sys.stderr.flush()
  sys.exit(status)


def refuse_arguments(args: list[str]) -> None:
  """Exits with one error line if a flags-only script got other arguments."""
  if args:
    exit_with_error(f"unexpected arguments {args}; this script takes only "
                    f"flags")


def parse_flags_or_exit(argv: list[str],
                        fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """``app.run``'s flags parser: one error line instead of absl's two.

  Args:
    argv: The command line, program name first.
    fv: The flags to parse into (absl's global ones by default).

  Returns:
    The arguments that are not flags, program name first.
  """
  try:
    return fv(argv)
  except flags.Error as e:
    exit_with_error(f"{e} (see --helpfull)")


def define_data_flags(fv: flags.FlagValues, *, default_dataset: str,
                      synthetic_train_size: int,
                      synthetic_test_size: int) -> None:
  """Defines --dataset, --data_dir and the synthetic sizes on ``fv``.

  Args:
    fv: The script's flags.
    default_dataset: ``--dataset``'s default.
    synthetic_train_size: ``--synthetic_train_size``'s default.
    synthetic_test_size: ``--synthetic_test_size``'s default.
  """
  # Registry names are checked when the registry is read (research.data
  # needs TensorFlow, which loads only after the flags are valid).
  flags.DEFINE_string("dataset", default_dataset,
                      "A registered data source (built in: cifar10, folder, "
                      "synthetic).", flag_values=fv)
  flags.DEFINE_string("data_dir", None,
                      "cifar10: cifar-10-batches-py/ or its parent (default: "
                      "Keras' download cache); folder: the folder holding "
                      "train/<class>/ and test/<class>/.", flag_values=fv)
  flags.DEFINE_integer("synthetic_train_size", synthetic_train_size,
                       "synthetic: training examples.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("synthetic_test_size", synthetic_test_size,
                       "synthetic: test examples.", lower_bound=1,
                       flag_values=fv)


def define_model_flags(fv: flags.FlagValues, *, l2_help: str) -> None:
  """Defines the model's flags on ``fv``: --model, --l2, --dropout,
  --resnet_depth, --[no]sync_batch_norm and --fused_batch_norm
  (``config.ModelConfig``)."""
  flags.DEFINE_string("model", "convnet",
                      "A registered model (built in: convnet, resnet).",
                      flag_values=fv)
  flags.DEFINE_float("l2", 0.0, l2_help, lower_bound=0.0, flag_values=fv)
  flags.DEFINE_float("dropout", 0.0,
                     "Dropout rate (convnet: before each dense layer; "
                     "resnet: before the classifier); each replica draws "
                     "its own masks. 0: none.", lower_bound=0.0,
                     upper_bound=0.99, flag_values=fv)
  flags.DEFINE_integer("resnet_depth", 20,
                       "resnet: 6n+2 layers (20, 32, 44, 56, 110; 8 and 14 "
                       "build too).", lower_bound=8, flag_values=fv)
  flags.register_validator(
      "resnet_depth", options.is_resnet_depth,
      message=f"--resnet_depth must be {options.RESNET_DEPTH_RULE}",
      flag_values=fv)
  flags.DEFINE_bool("sync_batch_norm", None,
                    "Batch-norm statistics over the global batch, all-reduced "
                    "over the replicas (--nosync_batch_norm: each replica's "
                    "own share). Default: on with more than one replica.",
                    flag_values=fv)
  flags.DEFINE_bool("fused_batch_norm", False,
                    "Batch norm trains on TensorFlow's fused kernel (the same "
                    "math, other float rounding; ResNet-20 steps 1.4x as "
                    "fast in float32 and 1.9x in bfloat16 on a CPU) where "
                    "its statistics are not synchronized over replicas.",
                    flag_values=fv)


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_writable_dir(path: str) -> bool:
  """Whether ``path`` is, or could be created as, a writable folder."""
  if os.path.exists(path):
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
  existing = _nearest_existing(path)
  return os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)


def define_json_out(fv: flags.FlagValues, help_text: str) -> None:
  """Defines --json_out on ``fv``, checked before anything runs: a file in
  an existing, writable folder.

  Args:
    fv: The script's flags.
    help_text: What the script writes there.
  """
  flags.DEFINE_string("json_out", None, help_text, flag_values=fv)

  def json_out_ok(path):
    # A long run must not end in a traceback because of where it reports.
    if path is None:
      return True
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(
        folder, os.W_OK | os.X_OK):
      raise flags.ValidationError(
          f"--json_out={path} is not a file in an existing, writable folder; "
          f"create the folder or pick another path")
    return True

  flags.register_validator("json_out", json_out_ok, flag_values=fv)


def write_json_or_exit(path: str, payload) -> None:
  """Writes ``payload`` as JSON to ``path`` (``--json_out``), or exits with
  one error line (the results printed before it stay on the screen)."""
  from research import files
  try:
    files.write_json(path, payload)
  except UserError as e:
    exit_with_error(str(e), status=e.exit_status)


def register_config_validators(fv: flags.FlagValues, part: str,
                               names: tuple[str, ...] | None = None) -> None:
  """Checks the flags that set fields of the config ``part`` (``optimizer``,
  ...) by that part's own rules (``config``), when they are parsed.

  Args:
    fv: The script's flags.
    part: The config part.
    names: Its flags to check (default: all of ``fv``'s that it has).
  """
  from research import config as config_lib  # No TensorFlow.

  def check(part, name, value):
    try:
      config_lib.check_flat_value(part, name, value)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True

  for name in names or [n for n in config_lib.flat_names(part) if n in fv]:
    flags.register_validator(
        name, lambda value, name=name: check(part, name, value),
        flag_values=fv)


def register_validators(fv: flags.FlagValues) -> None:
  """Validators of the training flags, checked before anything runs."""
  flags.register_validator(
      "epochs", lambda v: v is not None and v >= 1,
      message="--epochs must be a positive number of epochs",
      flag_values=fv)
  flags.register_validator(
      "batch_size", lambda v: v is not None and v >= 1,
      message="--batch_size must be a positive global batch size",
      flag_values=fv)
  register_config_validators(fv, "optimizer")
  register_config_validators(fv, "step",
                             ("label_smoothing", "clip_grad_norm"))

  def data_dir_ok(data_dir):
    if data_dir and not os.path.exists(data_dir):
      raise flags.ValidationError(
          f"--data_dir={data_dir} does not exist; pass the folder that holds "
          f"the data")
    return True

  flags.register_validator("data_dir", data_dir_ok, flag_values=fv)

  def model_dir_ok(value):
    if value and not check_writable_dir(value):
      raise flags.ValidationError(
          f"--model_dir={value} is not a writable folder; pick a folder you "
          f"can write to")
    return True

  flags.register_validator("model_dir", model_dir_ok, flag_values=fv)


def resolve_model_dir(fv: flags.FlagValues) -> str:
  """``--model_dir``, or ``logs/<run_name>``; created if missing.

  Args:
    fv: The parsed flags (``--model_dir``, ``--run_name``, ``--dataset``).

  Returns:
    The run directory, checked writable with room for checkpoints.

  Raises:
    UserError: if it cannot be created, or its name is not valid UTF-8
      (TensorFlow could not write into it; refused before it is created).
  """
  from research import data as data_lib
  model_dir = fv.model_dir
  if not model_dir:
    run_name = fv.run_name or (
        f"{fv.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    model_dir = os.path.join("logs", run_name)
  data_lib.require_utf8_path(model_dir, "--model_dir")
  try:
    os.makedirs(model_dir, exist_ok=True)
    # The real test of writability (permissions, a read-only mount).
    with tempfile.TemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise UserError(f"cannot write to --model_dir={model_dir} ({e.strerror}); "
                    f"pick a folder you can write to") from None
  free_mb = shutil.disk_usage(model_dir).free / 2**20
  if free_mb < MIN_FREE_MB:
    raise UserError(f"only {free_mb:.0f} MB free under --model_dir={model_dir}"
                    f"; checkpoints and event files need at least "
                    f"{MIN_FREE_MB} MB")
  return model_dir


def global_batch_size_from_flags(fv: flags.FlagValues, replicas: int) -> int:
  """``--per_replica_batch_size`` x replicas when set, else ``--batch_size``.

  Raises:
    UserError: if ``--batch_size`` does not divide over the replicas.
  """
  if fv.per_replica_batch_size:
    return fv.per_replica_batch_size * replicas
  if fv.batch_size % replicas:
    raise UserError(
        f"--batch_size={fv.batch_size} does not divide over the {replicas} "
        f"replicas; use a multiple of {replicas} or --per_replica_batch_size")
  return fv.batch_size


def train_config_from_flags(fv: flags.FlagValues, *, model_dir: str, strategy):
  """Turns the training flags into a ``TrainConfig``, field by flag name.

  The flags that are not fields as they stand are resolved first: the global
  batch size, XLA, the profile steps, the image size and the evaluation
  sets (``config.default_eval_sets`` when not given; none when given empty
  or with ``--noeval_in_loop``).

  Args:
    fv: The parsed training flags (scripts/train_loop.py's).
    model_dir: The run directory (``resolve_model_dir``).
    strategy: The run's ``tf.distribute`` strategy (its replica count and
      devices resolve the batch and XLA).

  Returns:
    The validated ``config.TrainConfig``.

  Raises:
    UserError: if the global batch does not divide over the replicas, or
      the flags make an impossible configuration.
  """
  from research import config as config_lib
  from research import distribute
  replicas = strategy.num_replicas_in_sync
  global_batch_size = global_batch_size_from_flags(fv, replicas)
  jit_compile = distribute.resolve_jit_compile(
      fv.jit_compile, strategy, deterministic=fv.deterministic)
  during, final = config_lib.default_eval_sets(fv.validation_size)
  if not fv.eval_in_loop:
    if fv["eval_sets"].present or fv["final_eval_sets"].present:
      raise UserError("--noeval_in_loop evaluates nothing in the loop: drop "
                      "--eval_sets and --final_eval_sets, or --noeval_in_loop")
    during = final = ()
  # Given, even empty (--eval_sets=), the flag wins over the default.
  if fv["eval_sets"].present:
    during = tuple(fv.eval_sets or ())
  if fv["final_eval_sets"].present:
    final = tuple(fv.final_eval_sets or ())
  resolved = {
      "model_dir": model_dir, "global_batch_size": global_batch_size,
      "jit_compile": jit_compile, "eval_sets": during,
      "final_eval_sets": final,
      "profile_steps": parse_profile_steps(fv.profile_steps),
      "resize_images": parse_image_size(fv.resize_images)}
  try:
    return config_lib.from_flat({**fv.flag_values_dict(), **resolved},
                                strict=False)
  except ValueError as e:
    raise UserError(f"{e}; check the flags") from None


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
  """``"20,30"`` -> ``(20, 30)``; None stays None.

  Raises:
    UserError: unless two integers 1 <= FIRST <= LAST.
  """
  if not value:
    return None
  parts = value.split(",")
  if (len(parts) == 2 and all(p.strip().isdigit() for p in parts) and
      1 <= int(parts[0]) <= int(parts[1])):
    return int(parts[0]), int(parts[1])
  raise UserError(f"--profile_steps={value} is not FIRST,LAST with "
                  f"1 <= FIRST <= LAST (e.g. 20,30)")


def parse_image_size(value: str | None) -> tuple[int, int] | None:
  """``"32x32"`` -> ``(32, 32)``; None stays None.

  Raises:
    UserError: for anything but two positive integers joined by ``x``.
  """
  if not value:
    return None
  parts = value.lower().split("x")
  if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
    return int(parts[0]), int(parts[1])
  raise UserError(f"--resize_images={value} is not HEIGHTxWIDTH (e.g. 32x32)")
