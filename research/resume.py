"""What a re-run may change in a run directory that already holds a run.

A run directory is one experiment: its checkpoints' global step means "this
many batches of *this* data, in *this* order, for *this* model". A command
that changes what the step or the data mean (another dataset, seed, global
batch, model, precision, recipe) must not resume it; it is refused before
anything is written. A few changes are meaningful on resume and allowed (and
recorded in ``run_record.json``): more or fewer ``epochs``, and the rate of a
constant schedule. Settings that change only how the run is carried out (call
sizes, checkpoint cadence, reporting, XLA, determinism, the NaN policy) may
change freely; they are recorded too.
"""

from __future__ import annotations

import os
from typing import Any

from research import config as config_lib
from research import data as data_lib
from research import files
from research.errors import UserError

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.json"

# Flat names (as the flags) whose change makes the run another experiment.
REFUSED = (
    "dataset", "data_dir", "synthetic_train_size", "synthetic_test_size",
    "resize_images", "augment", "cutout", "seed", "global_batch_size",
    "keep_short_batch", "model", "l2", "dropout", "resnet_depth",
    "sync_batch_norm", "fused_batch_norm", "mixed_precision", "optimizer",
    "weight_decay", "momentum", "nesterov", "lr_schedule", "warmup_steps",
    "lr_decay_rate", "lr_decay_steps", "label_smoothing", "clip_grad_norm",
    "validation_size", "best_metric", "ema_decay", "flip_average",
    "shift_average")


def data_facts(data: data_lib.ArrayData) -> dict[str, Any]:
  """What identifies a dataset's contents cheaply: sizes, classes, shape."""
  facts = {"train_examples": int(len(data.train_labels)),
           "test_examples": int(len(data.test_labels)),
           "class_names": list(data.class_names),
           "image_shape": list(data.image_shape)}
  if data.validation_labels is not None:
    facts["validation_examples"] = int(len(data.validation_labels))
  return facts


def _read_json(path: str) -> dict | None:
  return files.read_json(path, fix="it describes the run in its folder: "
                         "restore it or use a new --model_dir")


def _comparable(value):
  # JSON turns tuples into lists; compare them alike.
  return list(value) if isinstance(value, tuple) else value


def check(config: config_lib.TrainConfig, data: data_lib.ArrayData
          ) -> dict[str, list]:
  """Compares a new invocation with the run already in ``config.model_dir``.

  Args:
    config: The new invocation's resolved configuration.
    data: Its data (for the dataset's facts).

  Returns:
    The changed fields, ``name -> [old, new]`` (empty for a new run or an
    unchanged one); only fields that may change are in it.

  Raises:
    UserError: naming every field whose change would make the run another
      experiment, with old and new values; nothing has been written.
  """
  path = os.path.join(config.model_dir, CONFIG_FILE)
  stored = _read_json(path)
  if stored is None:
    return {}
  try:
    old = config_lib.to_flat(config_lib.from_json(
        {"model_dir": config.model_dir, **stored}))
  except (TypeError, ValueError) as e:
    raise UserError(f"{path} holds no valid configuration ({e}); restore it "
                    f"or use a new --model_dir") from None
  new = config_lib.to_flat(config)
  changes = {name: [_comparable(old[name]), _comparable(new[name])]
             for name in new if name != "model_dir" and
             _comparable(old[name]) != _comparable(new[name])}
  refused = {name: change for name, change in changes.items()
             if name in REFUSED}
  if "learning_rate" in changes and (new["lr_schedule"] != "constant" or
                                     new["warmup_steps"]):
    refused["learning_rate"] = changes["learning_rate"]
  facts = _read_json(os.path.join(config.model_dir, DATA_FILE))
  if facts is not None:
    for name, value in data_facts(data).items():
      if facts.get(name) != value:
        refused[f"data {name}"] = [facts.get(name), value]
  if refused:
    listed = "; ".join(f"{name} {old!r} -> {new!r}"
                       for name, (old, new) in refused.items())
    raise UserError(
        f"--model_dir={config.model_dir} holds a run with another "
        f"configuration ({listed}); resuming would mix two experiments: pass "
        f"a new --model_dir (or --run_name), or the run's own values to "
        f"resume it")
  return changes


def recorded_result(model_dir: str, step: int) -> dict | None:
  """The metrics of a run that finished at ``step``, or None if it has not
  (or its final results were never written)."""
  metrics = _read_json(os.path.join(model_dir, METRICS_FILE))
  if metrics is None or metrics.get("global_step") != step:
    return None
  return metrics
