"""A profiler trace of chosen training steps, for TensorBoard's Profile tab.

Viewing needs the ``tensorboard-plugin-profile`` package (the ``profile``
extra); recording needs only TensorFlow.
"""

from __future__ import annotations

import tensorflow as tf

from research.controller import Action
from research.controller import TrainCall


class StepProfiler(Action):
  """Traces global steps ``first`` to ``last`` (1-based, inclusive).

  The controller asks ``next_boundary`` so that its ``tf.function`` calls
  start right before ``first`` and end right after ``last``. A run resumed
  past ``first`` records nothing.
  """

  def __init__(self, *, logdir: str, steps: tuple[int, int] | None,
               enabled: bool = True):
    """Args:
      logdir: Where the trace goes (``<logdir>/plugins/profile/<time>/``).
      steps: ``(first, last)``, or None for no profiling.
      enabled: False on non-chief workers.

    Raises:
      ValueError: unless ``1 <= first <= last``.
    """
    if steps is not None and not 1 <= steps[0] <= steps[1]:
      raise ValueError(f"profile_steps must be FIRST,LAST with 1 <= FIRST <= "
                       f"LAST, got {steps}")
    self.logdir = logdir
    self.steps = steps if enabled else None
    self.active = False

  def next_boundary(self, step: int) -> int | None:
    """The next step count at which a call must end (None: no constraint)."""
    if self.steps is None:
      return None
    first, last = self.steps
    if step < first - 1:
      return first - 1
    if step < last:
      return last
    return None

  def before_train(self, step: int) -> None:
    """Starts tracing if the next step to run is ``first``."""
    if self.steps is not None and step == self.steps[0] - 1:
      tf.profiler.experimental.start(self.logdir)
      self.active = True

  def after_train(self, call: TrainCall) -> None:
    """Stops tracing once ``last`` has run."""
    if self.active and call.step >= self.steps[1]:
      self.close()

  def close(self) -> None:
    """Stops and writes the trace, if one is being recorded."""
    if self.active:
      tf.profiler.experimental.stop()
      self.active = False
