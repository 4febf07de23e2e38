"""Evaluating a run's checkpoint apart from training.

``evaluate_run`` rebuilds what a run trained from its ``config.json`` (the
data with the same validation split, the model in the same precision, the
step functions), restores a checkpoint (the latest, the best, or any path)
and evaluates it on chosen sets, with the same numbers an evaluation inside
the training loop gives. ``scripts/evaluate.py`` is its command line.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import tensorflow as tf

from research import checkpoints as checkpoints_lib
from research import config as config_lib
from research import data as data_lib
from research import export as export_lib
from research import files
from research.config import StepConfig
from research.errors import UserError
from research.resume import CONFIG_FILE
from research.selection import BEST_SUBDIR
from research.training import build_training


def summarize(result: dict[str, Any], class_names: Sequence[str]
              ) -> dict[str, Any]:
  """One set's evaluation as ``metrics.json`` and ``best/info.json`` hold
  it: accuracy, loss, counts, calibration and per-class accuracy."""
  summary = {name: result[name] for name in
             ("accuracy", "loss", "correct", "count", "nll", "brier", "ece")}
  summary["class_accuracy"] = dict(zip(
      class_names, [float(a) for a in result["class_accuracy"]]))
  return summary


def resolve_checkpoint(model_dir: str, which: str) -> str:
  """``latest``, ``best`` or a path, as a checkpoint path prefix.

  Raises:
    UserError: if the run has no such checkpoint (``export.latest_checkpoint``
      names a damaged state file).
  """
  if which == "latest":
    return export_lib.latest_checkpoint(
        os.path.join(model_dir, checkpoints_lib.CHECKPOINTS_SUBDIR))
  if which == "best":
    return export_lib.latest_checkpoint(
        os.path.join(model_dir, BEST_SUBDIR),
        first="the run kept no best checkpoint: train with --best_metric")
  return which


def evaluate_run(model_dir: str, *, checkpoint: str = "latest",
                 eval_sets: Sequence[str] | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of a training run on the default strategy.

  Args:
    model_dir: The run's directory.
    checkpoint: ``latest``, ``best`` or a checkpoint path prefix.
    eval_sets: Sets to evaluate (default: every set the run has).

  Returns:
    ``{"checkpoint", "step", "evaluations": {set: summarize(...)}}``.

  Raises:
    UserError: for a directory that is no run, a missing or damaged
      checkpoint, or a set the run does not have.
  """
  stored = files.read_json(
      os.path.join(model_dir, CONFIG_FILE),
      fix="it describes the run: restore it (train_loop.py writes it)")
  if stored is None:
    raise UserError(f"{data_lib.display_path(model_dir)} holds no "
                    f"{CONFIG_FILE}: --model_dir must be a training run's "
                    f"directory")
  try:
    config = config_lib.from_json({**stored, "model_dir": model_dir})
  except (TypeError, ValueError) as e:
    raise UserError(f"{CONFIG_FILE} in {model_dir} holds no valid "
                    f"configuration ({e})") from None
  path = resolve_checkpoint(model_dir, checkpoint)
  checkpoints_lib.check_checkpoint(
      path, fix="pass --checkpoint=latest, best or another checkpoint")
  data = data_lib.split_validation(data_lib.load(config.data,
                                                 seed=config.seed),
                                   config.data.validation_size)
  sets = tuple(eval_sets or data.eval_set_names)
  for name in sets:
    data.eval_set(name)  # Refuses a set the run does not have.
  batch = config.step.global_batch_size
  state, runner = build_training(
      strategy=tf.distribute.get_strategy(), model_config=config.model,
      optimizer_config=config.optimizer,
      step_config=StepConfig(global_batch_size=batch,
                             mixed_precision=config.step.mixed_precision),
      num_classes=data.num_classes, image_shape=data.image_shape,
      # Any length that fits the schedule: only the weights are used.
      total_steps=config.optimizer.warmup_steps + 1)
  try:
    state.checkpoint.restore(path).expect_partial()
  except (tf.errors.OpError, ValueError, AssertionError) as e:
    raise UserError(f"checkpoint {data_lib.display_path(path)} cannot be "
                    f"restored into the run's model "
                    f"({data_lib.describe_error(e)})") from None
  evaluations = {}
  with state.evaluation_weights():
    for name in sets:
      dataset = data_lib.make_eval_dataset(data, global_batch_size=batch,
                                           eval_set=name)
      result = runner.evaluate(
          dataset, data_lib.eval_steps(len(data.eval_set(name)[1]), batch))
      evaluations[name] = summarize(result, data.class_names)
  return {"checkpoint": path, "step": state.step, "evaluations": evaluations}
