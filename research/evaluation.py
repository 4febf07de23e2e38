"""Evaluating a run's checkpoints apart from training.

``RunEvaluator`` rebuilds what a run trained from its ``config.json`` (the
data with the same validation split, the model in the same precision, the
step functions) once, then restores and evaluates any of its checkpoints,
with the numbers an evaluation inside the training loop gives.
``evaluate_run`` evaluates one checkpoint (the latest, the best, or a path);
``evaluate_continuously`` is the sidecar evaluator, which waits for each new
checkpoint of a running job. ``scripts/evaluate.py`` is their command line.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import tensorflow as tf

from research import checkpoints as checkpoints_lib
from research import config as config_lib
from research import data as data_lib
from research import export as export_lib
from research import files
from research.config import StepConfig
from research.errors import UserError
from research.reporting import evaluation_scalars
from research.reporting import evaluation_summary
from research.resume import CONFIG_FILE
from research.resume import METRICS_FILE
from research.run_lock import RunLock
from research.selection import BEST_SUBDIR
from research.summaries import SummaryManager
from research.train import cadence_of
from research.training import build_training

# The sidecar's folder in a run directory: its TensorBoard runs
# (evaluator/validation, evaluator/test: never the trainer's) and results.
EVALUATOR_SUBDIR = "evaluator"
EVALUATIONS_FILE = "evaluations.json"


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


class RunEvaluator:
  """A training run rebuilt from its ``config.json`` on the default
  strategy, to evaluate any of its checkpoints.

  Attributes:
    model_dir: The run's directory.
    config: The run's configuration.
    data: Its data, with its validation split.
    total_steps: The run's last global step (its final checkpoint's).
  """

  def __init__(self, model_dir: str, *, flip_average: bool | None = None,
               shift_average: int | None = None):
    """Reads the run's configuration and data and builds its model.

    Args:
      model_dir: The run's directory.
      flip_average: Evaluate with (True) or without (False) test-time flip
        averaging instead of as the run does (None).
      shift_average: Evaluate with this test-time shift averaging
        (``ModelConfig.shift_average``; 0: none) instead of as the run does
        (None).

    Raises:
      UserError: for a directory that is no run (no or a damaged
        ``config.json``), or data that cannot be loaded.
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
    config = dataclasses.replace(
        config, model=config.model.with_test_time_augmentation(
            flip_average=flip_average, shift_average=shift_average))
    self.model_dir = model_dir
    self.config = config
    self.data = data_lib.split_validation(
        data_lib.load(config.data, seed=config.seed),
        config.data.validation_size)
    step = config.step
    self.total_steps = cadence_of(config, self.data).total_steps
    self._batch = step.global_batch_size
    self._state, self._runner = build_training(
        strategy=tf.distribute.get_strategy(), model_config=config.model,
        optimizer_config=config.optimizer,
        step_config=StepConfig(global_batch_size=self._batch,
                               mixed_precision=step.mixed_precision),
        num_classes=self.data.num_classes, image_shape=self.data.image_shape,
        # Any length that fits the schedule: only the weights are used.
        total_steps=config.optimizer.warmup_steps + 1)

  def sets(self, eval_sets: Sequence[str] | None) -> tuple[str, ...]:
    """The sets to evaluate: ``eval_sets``, or every set the run has.

    Raises:
      UserError: for a set the run does not have.
    """
    sets = tuple(eval_sets or self.data.eval_set_names)
    for name in sets:
      self.data.eval_set(name)  # Refuses a set the run does not have.
    return sets

  def evaluate(self, path: str, sets: Sequence[str]) -> dict[str, Any]:
    """Restores checkpoint ``path`` and evaluates its evaluation weights
    (the averages with an EMA) on ``sets``.

    Returns:
      ``{"checkpoint", "step", "results": {set: StepRunner.evaluate(...)}}``.

    Raises:
      UserError: for a missing, unreadable or damaged checkpoint, or one
        that does not fit the run's model.
    """
    checkpoints_lib.check_checkpoint(
        path, fix="pass --checkpoint=latest, best or another checkpoint")
    try:
      self._state.checkpoint.restore(path).expect_partial()
    except (tf.errors.OpError, ValueError, AssertionError) as e:
      raise UserError(f"checkpoint {data_lib.display_path(path)} cannot be "
                      f"restored into the run's model "
                      f"({data_lib.describe_error(e)})") from None
    results = {}
    with self._state.evaluation_weights():
      for name in sets:
        dataset = data_lib.make_eval_dataset(
            self.data, global_batch_size=self._batch, eval_set=name)
        results[name] = self._runner.evaluate(dataset, data_lib.eval_steps(
            len(self.data.eval_set(name)[1]), self._batch))
    return {"checkpoint": path, "step": self._state.step, "results": results}

  def summarize(self, evaluated: dict[str, Any]) -> dict[str, Any]:
    """``evaluate``'s result as JSON: ``{"checkpoint", "step",
    "flip_average", "shift_average", "evaluations": {set:
    reporting.evaluation_summary(...)}}``."""
    return {"checkpoint": evaluated["checkpoint"], "step": evaluated["step"],
            "flip_average": self.config.model.flip_average,
            "shift_average": self.config.model.shift_average,
            "evaluations": {
                name: evaluation_summary(result, self.data.class_names)
                for name, result in evaluated["results"].items()}}

  def finished_at(self, step: int) -> bool:
    """Whether the run's checkpoint of ``step`` is its last: the last step,
    or the step where early stopping ended it (its ``metrics.json``)."""
    if step >= self.total_steps:
      return True
    metrics = files.read_json(os.path.join(self.model_dir, METRICS_FILE),
                              fix="the trainer rewrites it when it ends")
    return bool(metrics and metrics.get("stopped_early") and
                metrics.get("global_step") == step)


def evaluate_run(model_dir: str, *, checkpoint: str = "latest",
                 eval_sets: Sequence[str] | None = None,
                 flip_average: bool | None = None,
                 shift_average: int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of a training run on the default strategy.

  Args:
    model_dir: The run's directory.
    checkpoint: ``latest``, ``best`` or a checkpoint path prefix.
    eval_sets: Sets to evaluate (default: every set the run has).
    flip_average: Override the run's test-time flip averaging (None: as
      the run evaluates).
    shift_average: Override the run's test-time shift averaging (None: as
      the run evaluates).

  Returns:
    ``RunEvaluator.summarize``'s form.

  Raises:
    UserError: for a directory that is no run, a missing or damaged
      checkpoint, or a set the run does not have.
  """
  evaluator = RunEvaluator(model_dir, flip_average=flip_average,
                           shift_average=shift_average)
  path = resolve_checkpoint(model_dir, checkpoint)
  sets = evaluator.sets(eval_sets)
  return evaluator.summarize(evaluator.evaluate(path, sets))


def _listed_checkpoints(directory: str) -> list[str]:
  """The checkpoints the state file of ``directory`` names (complete ones:
  TensorFlow names a checkpoint only after writing it), oldest first."""
  state = checkpoints_lib.read_state(
      directory, fix="the trainer rewrites it at its next save")
  if state is None:
    return []
  paths = [p if os.path.isabs(p) else os.path.join(directory, p)
           for p in state.all_model_checkpoint_paths]
  return sorted(paths, key=checkpoints_lib.checkpoint_number)


def evaluate_continuously(model_dir: str, *,
                          eval_sets: Sequence[str] | None = None,
                          timeout: float = 3600.0, poll_seconds: float = 2.0,
                          log: Callable[[str], None] = print,
                          sleep: Callable[[float], None] = time.sleep,
                          clock: Callable[[], float] = time.monotonic
                          ) -> list[dict[str, Any]]:
  """The sidecar evaluator: evaluates each new checkpoint of a run once.

  Polls the run's checkpoint state file and evaluates, oldest first, every
  checkpoint it names that is newer than the last one evaluated, at the
  checkpoint's own global step: all of them, not only the newest at each
  poll (``tf.train.checkpoints_iterator``'s way), so a checkpoint saved
  while another was being evaluated is not skipped unless rotation deleted
  it first. A checkpoint that cannot be read (rotated away between the
  listing and the reading) is skipped with a warning. Writes TensorBoard
  runs ``evaluator/<set>`` and ``evaluator/evaluations.json`` (the results
  so far; a restarted sidecar continues after its last step) under the run
  directory, holding ``evaluator/``'s lock. Stops after the run's final
  checkpoint (``RunEvaluator.finished_at``) or after ``timeout`` seconds
  without a new checkpoint.

  Args:
    model_dir: The run's directory (the trainer may not have saved yet).
    eval_sets: Sets to evaluate (default: every set the run has).
    timeout: Seconds to wait for a new checkpoint before stopping.
    poll_seconds: Seconds between looks at the state file.
    log: Receives one line per evaluated set, warning and stop.
    sleep: Waits (tests pass a fake).
    clock: Monotonic seconds (tests pass a fake).

  Returns:
    Every evaluation ``evaluations.json`` holds (``evaluate_run``'s form).

  Raises:
    UserError: for a directory where no run appears within ``timeout``, a
      set the run does not have, or another sidecar already evaluating the
      run.
  """
  config_path = os.path.join(model_dir, CONFIG_FILE)
  waiting_since = clock()
  while not os.path.exists(config_path):
    # Started beside a trainer that has not written its configuration yet.
    if clock() - waiting_since > timeout:
      raise UserError(f"no training run appeared in "
                      f"{data_lib.display_path(model_dir)} within {timeout:g} "
                      f"s (no {CONFIG_FILE}); start the trainer, or check "
                      f"--model_dir")
    sleep(poll_seconds)
  evaluator = RunEvaluator(model_dir)
  sets = evaluator.sets(eval_sets)
  out_dir = os.path.join(model_dir, EVALUATOR_SUBDIR)
  results_path = os.path.join(out_dir, EVALUATIONS_FILE)
  checkpoint_dir = os.path.join(model_dir, checkpoints_lib.CHECKPOINTS_SUBDIR)
  with RunLock(out_dir, holder="evaluator",
               named=f"the {EVALUATOR_SUBDIR}/ folder of --model_dir="
                     f"{data_lib.display_path(model_dir)}"):
    records = files.read_json(
        results_path, fix="delete it to evaluate every checkpoint again") or []
    done = max((r["step"] for r in records), default=-1)
    summaries = SummaryManager(model_dir=out_dir)
    waiting_since = clock()
    try:
      while not (done >= 0 and evaluator.finished_at(done)):
        try:
          fresh = [p for p in _listed_checkpoints(checkpoint_dir)
                   if checkpoints_lib.checkpoint_number(p) > done]
        except UserError as e:
          log(f"warning: {e}")
          fresh = []
        for path in fresh:
          done = checkpoints_lib.checkpoint_number(path)
          waiting_since = clock()
          try:
            evaluated = evaluator.evaluate(path, sets)
          except UserError as e:
            log(f"warning: skipped {data_lib.display_path(path)}: {e}")
            continue
          step = evaluated["step"]
          for name, result in evaluated["results"].items():
            summaries.scalars(name, evaluation_scalars(
                result, evaluator.data.class_names), step)
            log(f"evaluator {name} step {step}: accuracy "
                f"{result['accuracy']:.4f} loss {result['loss']:.4f} ece "
                f"{result['ece']:.4f}")
          summaries.commit()
          records.append(evaluator.summarize(evaluated))
          files.write_json(results_path, records)
        if not fresh and clock() - waiting_since > timeout:
          log(f"no new checkpoint for {timeout:g} s; the evaluator stops")
          return records
        if not fresh:
          sleep(poll_seconds)
    finally:
      summaries.close()
  log(f"evaluated the run's final checkpoint (step {done}); the evaluator "
      f"stops")
  return records
