"""TensorBoard summaries: one writer per split under the model directory.

Scalars are buffered and written when ``commit`` is called, which the loop
does right after a checkpoint is saved. A run that dies therefore never leaves
events for steps its checkpoint does not cover, so a resumed run's curves have
no duplicated steps.
"""

from __future__ import annotations

import os

import tensorflow as tf


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

  def _writer(self, split: str) -> tf.summary.SummaryWriter:
    if split not in self._writers:
      self._writers[split] = tf.summary.create_file_writer(
          os.path.join(self.model_dir, split))
    return self._writers[split]

  def scalars(self, split: str, values: dict[str, float], step: int) -> None:
    """Queues scalars ``<split>/<name>`` at ``step`` until the next commit.

    Args:
      split: ``train`` or ``eval`` (any subdirectory name works).
      values: Tag name to value.
      step: The global step.
    """
    if self.enabled:
      self._pending.extend((split, k, float(v), int(step))
                           for k, v in values.items())

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
