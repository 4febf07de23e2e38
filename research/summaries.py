"""TensorBoard summaries: one writer per split under the model directory.

Scalars are buffered and written when ``commit`` is called, which the loop
does right before it saves a checkpoint. A run killed after a commit but
before its checkpoint re-runs those steps when it resumes; the manager knows
from the existing event files (read with TensorBoard's own reader) which
steps each tag already has and does not write them again. So a resumed run's
curves show every step exactly once.
"""

from __future__ import annotations

import os

import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator


def last_logged_steps(event_dir: str) -> dict[str, int]:
  """The highest step of each scalar tag in ``event_dir`` (empty if none)."""
  if not tf.io.gfile.isdir(event_dir):
    return {}
  acc = event_accumulator.EventAccumulator(
      event_dir, size_guidance={event_accumulator.TENSORS: 0,
                                event_accumulator.SCALARS: 0})
  acc.Reload()
  last = {}
  for tag in acc.Tags()["tensors"]:
    last[tag] = max(e.step for e in acc.Tensors(tag))
  for tag in acc.Tags()["scalars"]:
    last[tag] = max(e.step for e in acc.Scalars(tag))
  return last


class SummaryManager:
  """Buffers scalars and writes them to ``<model_dir>/<split>/`` event files.

  On a non-chief worker (``enabled=False``) every call is a no-op.
  """

  def __init__(self, *, model_dir: str, enabled: bool = True):
    """Args:
      model_dir: The run directory; splits become subdirectories.
      enabled: Write anything at all (False on non-chief workers).
    """
    self.model_dir = model_dir
    self.enabled = enabled
    self._writers: dict[str, tf.summary.SummaryWriter] = {}
    self._pending: list[tuple[str, str, float, int]] = []
    self._written: dict[str, dict[str, int]] = {}

  def _last_written(self, split: str) -> dict[str, int]:
    if split not in self._written:
      self._written[split] = last_logged_steps(
          os.path.join(self.model_dir, split))
    return self._written[split]

  def _writer(self, split: str) -> tf.summary.SummaryWriter:
    if split not in self._writers:
      self._writers[split] = tf.summary.create_file_writer(
          os.path.join(self.model_dir, split))
    return self._writers[split]

  def scalars(self, split: str, values: dict[str, float], step: int) -> None:
    """Queues scalars ``<split>/<name>`` at ``step`` until the next commit.

    A tag's value at a step the event files already hold is dropped.

    Args:
      split: ``train`` or ``eval`` (any subdirectory name works).
      values: Tag name to value.
      step: The global step.
    """
    if not self.enabled:
      return
    written = self._last_written(split)
    self._pending.extend((split, k, float(v), int(step))
                         for k, v in values.items()
                         if int(step) > written.get(k, -1))

  def commit(self) -> None:
    """Writes every queued scalar and flushes the event files."""
    if not self.enabled:
      return
    for split, name, value, step in self._pending:
      with self._writer(split).as_default():
        tf.summary.scalar(name, value, step=step)
    self._pending.clear()
    for writer in self._writers.values():
      writer.flush()

  def close(self) -> None:
    """Commits what is queued and closes the writers."""
    self.commit()
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()
