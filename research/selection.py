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
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import tensorflow as tf

from research import files
from research.checkpoints import CheckpointKeeper
from research.controller import Action
from research.controller import Evaluation
from research.options import METRIC_DIRECTIONS

BEST_SUBDIR = "best"
INFO_FILE = "info.json"


def parse_metric(metric: str) -> tuple[str, str, bool]:
  """``"validation/accuracy"`` -> ``("validation", "accuracy", True)``: the
  set, the metric, and whether larger is better (the name was checked by
  ``config.LoopConfig``)."""
  set_name, _, name = metric.partition("/")
  return set_name, name, METRIC_DIRECTIONS[name] == "max"


class SelectionState(tf.Module):
  """What selection remembers, checkpointed with the run.

  Attributes:
    best_value: The best value so far (NaN before the first evaluation).
    best_step: Its global step (-1 before).
    stale_evaluations: Evaluations since the last improvement by more than
      the early-stopping margin.
    reference_value: The value of that last improvement.
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


def _better(value: float, than: float, maximize: bool, margin: float = 0.0
            ) -> bool:
  if math.isnan(than):
    return not math.isnan(value)
  return value > than + margin if maximize else value < than - margin


def evaluation_summary(evaluation: Evaluation) -> dict[str, dict[str, Any]]:
  """Each set's scalar results of an evaluation (what info.json keeps)."""
  return {name: {key: float(result[key]) for key in
                 ("accuracy", "loss", "nll", "brier", "ece")} |
          {"correct": int(result["correct"]), "count": int(result["count"])}
          for name, result in evaluation.result.items()}


class BestCheckpoint(Action):
  """After each evaluation of the metric's set, saves the weights if they
  are the best so far."""

  def __init__(self, *, metric: str, state: SelectionState,
               checkpoint: tf.train.Checkpoint, model_dir: str,
               is_chief: bool, log: Callable[[str], None]):
    """Args:
      metric: ``SET/METRIC`` (``parse_metric``).
      state: The checkpointed selection state.
      checkpoint: What to save (the run's whole state).
      model_dir: The run directory; the checkpoint goes to ``best/``.
      is_chief: Whether this process writes (others save to scratch: the
        save is collective).
      log: Receives a line at each new best.
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
    self.improved = False

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
    self.state.best_value.assign(value)
    self.state.best_step.assign(evaluation.step)
    path = self.keeper.save(evaluation.step)
    if self.is_chief:
      files.write_json(os.path.join(self.directory, INFO_FILE), {
          "step": evaluation.step, "metric": self.metric, "value": value,
          "checkpoint": os.path.basename(path),
          "evaluations": evaluation_summary(evaluation)})
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
