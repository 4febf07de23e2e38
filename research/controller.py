"""The cadence of a run: how many steps each call trains, and what follows it.

The ``Controller`` (after Orbit's) owns only the cadence. It asks a *trainer*
to train ``n`` steps and an evaluator to evaluate, sizes each call so that it
ends exactly at epoch, evaluation, checkpoint and action boundaries, and after
each call decides, in this order:

1. stop on a non-finite step (``stop_on_nonfinite``), saving nothing;
2. the train actions;
3. evaluate (at the end of each epoch and every ``eval_every_steps``), then
   the eval actions; after the last step, also the ``final_evaluator``'s
   sets (the test set of a run that selects on validation);
4. commit the summaries, then save a checkpoint (every
   ``checkpoint_every_steps`` and at the end), so that the event files never
   lag behind a checkpoint; without periodic checkpoints the summaries are
   committed after every call;
5. stop on request (preemption, Ctrl-C): commit, save, raise
   ``Preempted``;
6. end early when an action gives a ``stop_reason`` (early stopping): save,
   then finish as after the last step (``stop_reason`` says why).

Everything else (console lines, TensorBoard, histograms, images, profiling,
the export) is an ``Action``; the controller only calls their hooks. It
depends on nothing but these small interfaces, so tests drive it with fakes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, Sequence

from research.errors import NonFiniteLossError
from research.preemption import Preempted


class Trainer(Protocol):
  """Trains; the controller's view of the step functions."""

  def train(self, num_steps: int) -> dict[str, Any]:
    """Runs ``num_steps`` steps and waits for them.

    Returns:
      The call's outputs; the controller reads only ``nonfinite_step`` (the
      index in the call of the first step whose loss or gradient was not
      finite, or -1).
    """


class Evaluator(Protocol):
  """Evaluates the current weights."""

  def evaluate(self) -> dict[str, dict[str, Any]]:
    """Returns each evaluated set's result, by set name (passed to the
    eval actions)."""


class Checkpointer(Protocol):
  """Saves checkpoints (``checkpoints.CheckpointKeeper``)."""

  def save(self, step: int) -> str:
    """Saves the state of ``step``; returns the checkpoint's path."""

  def latest(self) -> str | None:
    """The newest saved checkpoint, or None."""


class Summaries(Protocol):
  """Buffered summaries (``summaries.SummaryManager``)."""

  def commit(self) -> None:
    """Writes what is buffered to the event files."""

  def close(self) -> None:
    """Commits and closes the event files."""


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When calls end and what happens after them, in global steps.

  Attributes:
    total_steps: Steps of the whole run.
    steps_per_loop: Most steps in one call.
    steps_per_epoch: An evaluation follows the last step of every epoch.
    eval_every_steps: Also evaluate every this many steps (0: epochs only).
    checkpoint_every_steps: Save every this many steps (0: only at the end).
  """
  total_steps: int
  steps_per_loop: int
  steps_per_epoch: int
  eval_every_steps: int = 0
  checkpoint_every_steps: int = 0

  def __post_init__(self):
    for name in ("total_steps", "steps_per_loop", "steps_per_epoch"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every_steps", "checkpoint_every_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

  def _next_multiple(self, step: int, every: int) -> int:
    return (step // every + 1) * every if every else self.total_steps

  def boundary_after(self, step: int) -> int:
    """The first step after ``step`` at which a call must end."""
    return min(self.total_steps,
               self._next_multiple(step, self.steps_per_epoch),
               self._next_multiple(step, self.eval_every_steps),
               self._next_multiple(step, self.checkpoint_every_steps))

  def evaluates_at(self, step: int) -> bool:
    """Whether an evaluation follows ``step``."""
    return step % self.steps_per_epoch == 0 or bool(
        self.eval_every_steps and step % self.eval_every_steps == 0)

  def saves_at(self, step: int) -> bool:
    """Whether a checkpoint follows ``step``."""
    return step == self.total_steps or bool(
        self.checkpoint_every_steps and
        step % self.checkpoint_every_steps == 0)


@dataclasses.dataclass(frozen=True)
class TrainCall:
  """One call of the trainer, as the train actions see it.

  Attributes:
    first_step: The global step before the call.
    step: The global step after it.
    outputs: The trainer's outputs.
    seconds: Wall time of the call.
  """
  first_step: int
  step: int
  outputs: dict[str, Any]
  seconds: float

  @property
  def num_steps(self) -> int:
    return self.step - self.first_step


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation, as the eval and end actions see it.

  Attributes:
    step: The global step of the evaluated weights.
    result: The evaluator's result: set name -> that set's result.
    seconds: Wall time of the evaluation.
  """
  step: int
  result: dict[str, Any]
  seconds: float


class Action:
  """Something done around the training calls; every hook is optional.

  Subclasses override the hooks they need. Hooks run in the order the
  actions were given to the controller.
  """

  def next_boundary(self, step: int) -> int | None:
    """A step after ``step`` at which a call must end (None: no need)."""
    del step
    return None

  def before_train(self, step: int) -> None:
    """Runs before a call that starts at global step ``step``."""

  def after_train(self, call: TrainCall) -> None:
    """Runs after every call."""

  def after_evaluation(self, evaluation: Evaluation) -> None:
    """Runs after every evaluation."""

  def at_end(self, evaluation: Evaluation) -> None:
    """Runs once after the last step, with the last evaluation."""

  def stop_reason(self) -> str | None:
    """Asked after every call: a reason ends training there, as if it were
    the last step (None: go on)."""
    return None

  def close(self) -> None:
    """Runs when the run ends in any way (also on errors)."""


class Controller:
  """Runs training to ``cadence.total_steps`` (see the module docstring)."""

  def __init__(self, *, trainer: Trainer, evaluator: Evaluator | None,
               cadence: Cadence, start_step: int, checkpointer: Checkpointer,
               summaries: Summaries, actions: Sequence[Action] = (),
               stop_requested: Callable[[], str | None] = lambda: None,
               stop_on_nonfinite: bool = True,
               final_evaluator: Callable[[], dict[str, Any]] | None = None,
               log: Callable[[str], None] = print):
    """Args:
      trainer: Trains ``n`` steps per call.
      evaluator: Evaluates the current weights; None: no evaluation on
        the cadence (the final evaluator may still run).
      cadence: Call sizes, evaluations and checkpoints.
      start_step: The global step training starts from (after a restore).
      checkpointer: Saves checkpoints.
      summaries: Committed before every save.
      actions: Side concerns, called at their hooks in this order.
      stop_requested: Asked after every call before the last; the name of
        a signal (``"SIGTERM"``, ``"SIGINT"``: agreed by all workers) saves a
        checkpoint and raises ``Preempted``; None goes on.
      stop_on_nonfinite: A call reporting a non-finite step raises
        ``NonFiniteLossError`` before anything is saved.
      final_evaluator: Evaluates, once after the last step, the sets that
        only the end evaluates (as ``Evaluator.evaluate``); its results
        join the last evaluation's.
      log: Receives the controller's own console lines.

    Raises:
      ValueError: if ``start_step`` is negative.
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    self.trainer = trainer
    self.evaluator = evaluator
    self.cadence = cadence
    self.step = start_step
    self.checkpointer = checkpointer
    self.summaries = summaries
    self.actions = list(actions)
    self.stop_requested = stop_requested
    self.stop_on_nonfinite = stop_on_nonfinite
    self.final_evaluator = final_evaluator
    self.log = log
    self.stop_reason: str | None = None

  def next_call_size(self, step: int) -> int:
    """Steps of the call starting at ``step``: at most ``steps_per_loop``,
    ending at the first boundary of the cadence or an action."""
    end = min([step + self.cadence.steps_per_loop,
               self.cadence.boundary_after(step)] +
              [b for b in (a.next_boundary(step) for a in self.actions)
               if b is not None and b > step])
    return end - step

  def run(self) -> Evaluation:
    """Trains what is left, evaluating and saving on the cadence.

    A run whose start step is already the total, or whose actions already
    give a stop reason (a run stopped early, resumed), runs no step and
    evaluates once (its last evaluation is not in memory).

    Returns:
      The last evaluation (with the final evaluator's sets added).

    Raises:
      NonFiniteLossError: on a non-finite step with ``stop_on_nonfinite``;
        nothing of that call is saved.
      Preempted: after a stop request, once its checkpoint is saved.
    """
    try:
      last = None
      self.stop_reason = self._stop_reason()
      while self.step < self.cadence.total_steps and not self.stop_reason:
        self._train_call()
        if self.evaluator and self.cadence.evaluates_at(self.step):
          last = self._evaluate()
        self.stop_reason = self._stop_reason()
        if self.cadence.saves_at(self.step) or self.stop_reason:
          self._save()
        elif not self.cadence.checkpoint_every_steps:
          self.summaries.commit()
        if self.stop_reason:
          self.log(f"{self.stop_reason}; stopped at step {self.step}/"
                   f"{self.cadence.total_steps}")
          break
        signal_name = (self.stop_requested()
                       if self.step < self.cadence.total_steps else None)
        if signal_name:
          path = self._save()
          self.summaries.close()
          what = ("interrupted" if signal_name == "SIGINT"
                  else f"stopped by {signal_name}")
          self.log(f"{what} at step {self.step}/{self.cadence.total_steps}; "
                   f"checkpoint saved; run the same command to resume")
          raise Preempted(self.step, path, signal_name)
      if last is None:
        last = (self._evaluate() if self.evaluator
                else Evaluation(self.step, {}, 0.0))
      if self.final_evaluator is not None:
        extra = self._evaluate(self.final_evaluator)
        last = Evaluation(self.step, {**last.result, **extra.result},
                          last.seconds + extra.seconds)
      self.summaries.close()
      for action in self.actions:
        action.at_end(last)
      return last
    finally:
      for action in self.actions:
        action.close()

  def _stop_reason(self) -> str | None:
    # Ending early at the last step would be no early end.
    if self.step >= self.cadence.total_steps:
      return None
    return next((reason for reason in (a.stop_reason() for a in self.actions)
                 if reason), None)

  def _train_call(self) -> None:
    num_steps = self.next_call_size(self.step)
    for action in self.actions:
      action.before_train(self.step)
    start = time.time()
    outputs = self.trainer.train(num_steps)
    seconds = time.time() - start
    bad = int(outputs["nonfinite_step"])
    if bad >= 0 and self.stop_on_nonfinite:
      raise NonFiniteLossError(
          f"loss or gradient is not finite at step {self.step + bad + 1}; "
          f"training stopped without saving (the last good checkpoint is "
          f"{self.checkpointer.latest() or 'none'}); lower --learning_rate, "
          f"check the data, or pass --nan_policy=skip")
    call = TrainCall(self.step, self.step + num_steps, outputs, seconds)
    self.step = call.step
    for action in self.actions:
      action.after_train(call)

  def _evaluate(self, evaluate: Callable[[], dict[str, Any]] | None = None
                ) -> Evaluation:
    start = time.time()
    result = (evaluate or self.evaluator.evaluate)()
    evaluation = Evaluation(self.step, result, time.time() - start)
    for action in self.actions:
      action.after_evaluation(evaluation)
    return evaluation

  def _save(self) -> str:
    # Event files first: a checkpoint never runs ahead of its summaries.
    self.summaries.commit()
    return self.checkpointer.save(self.step)
