"""Graceful stop on SIGTERM (preemption), agreed by every worker.

A SIGTERM only sets a flag. After each training call the loop asks
``should_stop``: under a multi-worker strategy the flag is combined over all
workers with a collective sum, so every worker stops after the same step and
takes part in the same final (collective) checkpoint save. The process then
exits with ``PREEMPTED_EXIT_STATUS``.

TensorFlow's ``PreemptionCheckpointHandler`` does the same through the
coordination service but owns checkpoint numbering and exits by itself; this
small handler fits a loop that already saves by global step.
"""

from __future__ import annotations

import signal
import threading

import tensorflow as tf

# 128 + SIGTERM, as a shell reports a process ended by SIGTERM. Schedulers
# such as Kubeflow's TFJob (restartPolicy: ExitCode) treat 128-255 as
# retryable, so the job is restarted and resumes from the checkpoint.
PREEMPTED_EXIT_STATUS = 143


class PreemptionWatcher:
  """Turns SIGTERM into a stop request the loop can act on between calls."""

  def __init__(self, strategy: tf.distribute.Strategy, *,
               signals=(signal.SIGTERM,)):
    """Installs the signal handlers (only possible in the main thread).

    Args:
      strategy: The run's strategy; its replicas vote on stopping.
      signals: The signals that request a stop.
    """
    self.strategy = strategy
    self._requested = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    self._multi_worker = strategy.extended._in_multi_worker_mode()  # pylint: disable=protected-access
    self._vote = tf.function(self._vote_fn)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._requested.set()

  def _vote_fn(self, flag):
    per_replica = self.strategy.run(lambda f: tf.identity(f), args=(flag,))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                axis=None)

  def should_stop(self) -> bool:
    """Whether this or (under multi-worker) any worker got a stop signal."""
    local = self._requested.is_set()
    if not self._multi_worker:
      return local
    return int(self._vote(tf.constant(int(local))).numpy()) > 0

  def close(self) -> None:
    """Restores the previous signal handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class Preempted(Exception):
  """Raised after the checkpoint of a stop request has been saved."""

  def __init__(self, step: int, checkpoint: str | None):
    super().__init__(f"stopped by SIGTERM at step {step}; saved {checkpoint}")
    self.step = step
    self.checkpoint = checkpoint
