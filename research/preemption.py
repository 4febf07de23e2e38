"""Graceful stop on SIGTERM (preemption) and Ctrl-C, agreed by every worker.

A SIGTERM or a first SIGINT only sets a flag. After each training call the
controller asks ``should_stop``: under a multi-worker strategy the requests
of all workers are summed (a collective), so every worker stops after the
same step, for the strongest request (Ctrl-C over SIGTERM), and takes part in the same final (collective) checkpoint save.
The process then exits with the signal's status (``Preempted.exit_status``):
143 for SIGTERM, 130 for SIGINT, as a shell reports them. A second SIGINT
aborts at once (``KeyboardInterrupt``), without saving.

TensorFlow's ``PreemptionCheckpointHandler`` does the same through the
coordination service but owns checkpoint numbering and exits by itself; this
small handler fits a loop that already saves by global step.
"""

from __future__ import annotations

import signal
import threading

import tensorflow as tf

from research.options import INTERRUPTED_EXIT_STATUS
from research.options import PREEMPTED_EXIT_STATUS

# Stop requests by strength: the stronger wins, so one worker's Ctrl-C is
# every worker's.
_NO_STOP, _SIGTERM, _SIGINT = 0, 1, 2
_CODES = {signal.SIGTERM: _SIGTERM, signal.SIGINT: _SIGINT}
_NAMES = {_SIGTERM: "SIGTERM", _SIGINT: "SIGINT"}


class PreemptionWatcher:
  """Turns SIGTERM and Ctrl-C into a stop request the loop acts on between
  calls."""

  def __init__(self, strategy: tf.distribute.Strategy, *,
               signals=(signal.SIGTERM, signal.SIGINT)):
    """Installs the signal handlers (only possible in the main thread).

    Args:
      strategy: The run's strategy; its replicas vote on stopping.
      signals: The signals that request a stop.
    """
    self.strategy = strategy
    self._requested = _NO_STOP
    self._lock = threading.Lock()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    self._multi_worker = strategy.extended._in_multi_worker_mode()  # pylint: disable=protected-access
    self._vote = tf.function(self._vote_fn)

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._requested == _SIGINT:
      raise KeyboardInterrupt  # The second Ctrl-C: stop at once.
    with self._lock:
      self._requested = max(self._requested, _CODES.get(signum, _SIGTERM))

  def _vote_fn(self, requests):
    per_replica = self.strategy.run(lambda r: tf.identity(r),
                                    args=(requests,))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                axis=None)

  @staticmethod
  def vote_input(code: int) -> tf.Tensor:
    """What a worker contributes to the vote: a one-hot of its request.

    Counts of workers asking for each stop are summed (collectives have no
    max); float32 because collectives on GPUs refuse int32
    (tensorflow#56184).
    """
    return tf.one_hot(code, len(_NAMES) + 1, dtype=tf.float32)

  def should_stop(self) -> str | None:
    """Which stop this or (under multi-worker) any worker was asked for:
    ``"SIGINT"`` (wins), ``"SIGTERM"``, or None."""
    code = self._requested
    if self._multi_worker:
      counts = self._vote(self.vote_input(code)).numpy()
      code = max((c for c in _NAMES if counts[c] > 0), default=_NO_STOP)
    return _NAMES.get(code)

  def close(self) -> None:
    """Restores the previous signal handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class Preempted(Exception):
  """Raised after the checkpoint of a stop request has been saved.

  Attributes:
    step: The step saved.
    checkpoint: Its path.
    signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
    exit_status: The process's exit status for it (143 or 130).
  """

  def __init__(self, step: int, checkpoint: str | None,
               signal_name: str = "SIGTERM"):
    what = ("interrupted" if signal_name == "SIGINT"
            else f"stopped by {signal_name}")
    super().__init__(f"{what} at step {step}; saved {checkpoint}")
    self.step = step
    self.checkpoint = checkpoint
    self.signal_name = signal_name
    self.exit_status = (INTERRUPTED_EXIT_STATUS if signal_name == "SIGINT"
                        else PREEMPTED_EXIT_STATUS)
