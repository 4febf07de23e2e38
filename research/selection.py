"""Model selection on the validation set: the best checkpoint and early
stopping, as actions.

``BestCheckpoint`` saves the weights of the best evaluation of one metric
(``--best_metric=validation/accuracy``) to ``<model_dir>/best/``, which
rotation never touches, with ``best/info.json`` saying which evaluation it
was. ``EarlyStopping`` ends training after ``patience`` evaluations without
an improvement of that metric. What they remember (the best value and step,
the evaluations since the last improvement) lives in ``SelectionState``, in
the run's checkpoints, so a resumed run picks up exactly where the restored
step left it.

The best checkpoint holds its own ``info.json`` (``SelectionState.best_info``
is set before the save), so the checkpoint is the one truth: a process
killed after a best save leaves ``best/`` ahead of the regular checkpoint it
resumes from, and possibly an ``info.json`` not yet rewritten; a resumed
``BestCheckpoint`` adopts what ``best/`` holds (a real evaluation of this
run's weights) and rewrites ``info.json`` from it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Sequence

import tensorflow as tf

from research import files
from research.checkpoints import CheckpointKeeper
from research.controller import Action
from research.controller import Evaluation
from research.options import METRIC_DIRECTIONS
from research.options import split_metric
from research.reporting import evaluation_summary

BEST_SUBDIR = "best"
INFO_FILE = "info.json"


def parse_metric(metric: str) -> tuple[str, str, bool]:
  """``"validation/accuracy"`` -> ``("validation", "accuracy", True)``: the
  set, the metric, and whether larger is better.

  Raises:
    ValueError: for a name that is not SET/METRIC (``options.split_metric``).
  """
  set_name, name = split_metric(metric)
  return set_name, name, METRIC_DIRECTIONS[name] == "max"


class SelectionState(tf.Module):
  """What selection remembers, checkpointed with the run.

  Attributes:
    best_value: The best value so far (NaN before the first evaluation).
    best_step: Its global step (-1 before).
    stale_evaluations: Evaluations since the last improvement by more than
      the early-stopping margin.
    reference_value: The value of that last improvement.
    best_info: ``info.json`` of the best evaluation, as JSON text ("" before).
  """

  def __init__(self):
    super().__init__(name="selection")
    self.best_value = tf.Variable(math.nan, dtype=tf.float64,
                                  trainable=False, name="best_value")
    self.best_step = tf.Variable(-1, dtype=tf.int64, trainable=False,
                                 name="best_step")
    self.stale_evaluations = tf.Variable(0, dtype=tf.int64, trainable=False,
                                         name="stale_evaluations")
    self.reference_value = tf.Variable(math.nan, dtype=tf.float64,
                                       trainable=False,
                                       name="reference_value")
    self.best_info = tf.Variable("", dtype=tf.string, trainable=False,
                                 name="best_info")


def _better(value: float, than: float, maximize: bool, margin: float = 0.0
            ) -> bool:
  if math.isnan(than):
    return not math.isnan(value)
  return value > than + margin if maximize else value < than - margin


class BestCheckpoint(Action):
  """After each evaluation of the metric's set, saves the weights if they
  are the best so far."""

  def __init__(self, *, metric: str, state: SelectionState,
               checkpoint: tf.train.Checkpoint, model_dir: str,
               is_chief: bool, log: Callable[[str], None],
               class_names: Sequence[str] = ()):
    """Args:
      metric: ``SET/METRIC`` (``parse_metric``).
      state: The checkpointed selection state.
      checkpoint: What to save (the run's whole state).
      model_dir: The run directory; the checkpoint goes to ``best/``.
      is_chief: Whether this process writes (others save to scratch: the
        save is collective).
      log: Receives a line at each new best.
      class_names: Name of each label id (for the per-class accuracies in
        ``info.json``).
    """
    self.metric = metric
    self.set_name, self.name, self.maximize = parse_metric(metric)
    self.state = state
    self.directory = os.path.join(model_dir, BEST_SUBDIR)
    self.keeper = CheckpointKeeper(checkpoint=checkpoint,
                                   directory=self.directory, max_to_keep=1,
                                   is_chief=is_chief)
    self.is_chief = is_chief
    self.log = log
    self.class_names = tuple(class_names)
    self.improved = False
    self._adopt_saved_best()

  @property
  def path(self) -> str | None:
    """The best checkpoint, or None before the first."""
    return self.keeper.latest()

  def info(self) -> dict | None:
    """``best/info.json``: step, metric, value and every set's results of
    that evaluation; None before the first best."""
    return files.read_json(os.path.join(self.directory, INFO_FILE),
                           fix="it is rewritten at the next best "
                           "evaluation: remove it")

  def _adopt_saved_best(self) -> None:
    """Makes the state and ``info.json`` agree with ``best/``'s checkpoint
    (see the module docstring). Every worker reads it (resuming needs the
    run directory shared anyway), so all take the same decisions."""
    path = tf.train.latest_checkpoint(self.directory)
    if path is None:
      return
    prefix = "selection/"
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    reader = tf.train.load_checkpoint(path)
    if not reader.has_tensor(prefix + "best_info" + suffix):
      return  # Saved before checkpoints held their info.
    saved = {name: reader.get_tensor(prefix + name + suffix)
             for name in ("best_value", "best_step", "best_info")}
    if int(saved["best_step"]) != int(self.state.best_step.numpy()):
      self.state.best_value.assign(float(saved["best_value"]))
      self.state.best_step.assign(int(saved["best_step"]))
      self.state.best_info.assign(saved["best_info"])
      self.log(f"best/ holds the evaluation of step {int(saved['best_step'])}"
               f", newer than the restored checkpoint's: selection goes on "
               f"from it")
    info = json.loads(saved["best_info"].decode("utf-8"))
    if self.is_chief and self.info() != info:
      files.write_json(os.path.join(self.directory, INFO_FILE), info)

  def after_evaluation(self, evaluation: Evaluation) -> None:
    result = evaluation.result.get(self.set_name)
    self.improved = False
    if result is None:
      return
    value = float(result[self.name])
    if not _better(value, float(self.state.best_value.numpy()),
                   self.maximize):
      return
    self.improved = True
    info = {"step": evaluation.step, "metric": self.metric, "value": value,
            "checkpoint": f"ckpt-{evaluation.step}",
            "evaluations": {
                name: evaluation_summary(result, self.class_names)
                for name, result in evaluation.result.items()}}
    self.state.best_value.assign(value)
    self.state.best_step.assign(evaluation.step)
    # In the checkpoint itself: info.json can always be rewritten from it.
    self.state.best_info.assign(json.dumps(info, sort_keys=True))
    self.keeper.save(evaluation.step)
    if self.is_chief:
      files.write_json(os.path.join(self.directory, INFO_FILE), info)
    self.log(f"best {self.metric} {value:.4f} at step {evaluation.step}; "
             f"saved to {self.directory}")


class EarlyStopping(Action):
  """Ends training after ``patience`` evaluations in a row that do not
  improve the best metric by more than ``min_delta``."""

  def __init__(self, *, best: BestCheckpoint, patience: int,
               min_delta: float = 0.0):
    """Args:
      best: The best-checkpoint action (its metric and state).
      patience: Evaluations without improvement that end training (>= 1).
      min_delta: The improvement that counts.

    Raises:
      ValueError: for patience < 1 or a negative min_delta.
    """
    if patience < 1 or min_delta < 0:
      raise ValueError(f"patience must be >= 1 and min_delta >= 0, got "
                       f"{patience}, {min_delta}")
    self.best = best
    self.patience = patience
    self.min_delta = min_delta
    self.reason: str | None = None
    # A run that stopped early and was resumed (say, killed before it wrote
    # metrics.json) stops again at once, as the restored count says.
    if int(best.state.stale_evaluations.numpy()) >= patience:
      self._set_reason(int(best.state.stale_evaluations.numpy()))

  def after_evaluation(self, evaluation: Evaluation) -> None:
    result = evaluation.result.get(self.best.set_name)
    if result is None:
      return
    value = float(result[self.best.name])
    state = self.best.state
    reference = float(state.reference_value.numpy())
    if math.isnan(reference):
      # Early stopping turned on in a resumed run: count from the best.
      reference = float(state.best_value.numpy())
      if evaluation.step == int(state.best_step.numpy()):
        reference = math.nan  # This evaluation is the best: it counts.
    if _better(value, reference, self.best.maximize, self.min_delta):
      state.reference_value.assign(value)
      state.stale_evaluations.assign(0)
      return
    state.stale_evaluations.assign_add(1)
    stale = int(state.stale_evaluations.numpy())
    if stale >= self.patience:
      self._set_reason(stale)

  def _set_reason(self, stale: int) -> None:
    state = self.best.state
    self.reason = (
        f"early stopping: {self.best.metric} has not improved by more "
        f"than {self.min_delta:g} in {stale} evaluations (best "
        f"{float(state.best_value.numpy()):.4f} at step "
        f"{int(state.best_step.numpy())})")

  def stop_reason(self) -> str | None:
    return self.reason
