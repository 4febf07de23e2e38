"""TensorBoard summaries: one writer per split under the model directory.

Scalars, histograms and images are buffered and written when ``commit`` is called, which the loop
does right before it saves a checkpoint. A run killed after a commit but
before its checkpoint re-runs those steps when it resumes; the manager knows
from the existing event files (read with TensorBoard's own reader) which
steps each tag already has and does not write them again. So a resumed run's
curves show every step exactly once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api as hparams_api

# Where a run's hyper-parameters go: the run directory itself, whose
# subdirectories (train/, validation/, test/) hold the metrics the HParams
# tab shows.
HPARAMS_TAG = "_hparams_/session_start_info"


def last_logged_steps(event_dir: str) -> dict[str, int]:
  """The highest step of each tag in ``event_dir`` (empty if none).

  TF2 writes every summary (scalars, histograms, images, hparams) as a tensor
  summary; ``scalars`` covers event files of older writers.
  """
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


def _tf_value(value: Any) -> tf.Tensor:
  return tf.convert_to_tensor(np.asarray(value))


_WRITERS = {
    "scalar": lambda name, v, step: tf.summary.scalar(name, float(v), step),
    "histogram": lambda name, v, step: tf.summary.histogram(
        name, _tf_value(v), step),
    "image": lambda name, v, step: tf.summary.image(
        name, _tf_value(v), step, max_outputs=len(v)),
}


class SummaryManager:
  """Buffers summaries and writes them to ``<model_dir>/<split>/`` events.

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
    self._pending: list[tuple[str, str, str, Any, int]] = []
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

  def _queue(self, kind: str, split: str, values: dict[str, Any],
             step: int) -> None:
    if not self.enabled:
      return
    written = self._last_written(split)
    self._pending.extend((kind, split, k, v, int(step))
                         for k, v in values.items()
                         if int(step) > written.get(k, -1))

  def scalars(self, split: str, values: dict[str, float], step: int) -> None:
    """Queues scalars ``<split>/<name>`` at ``step`` until the next commit.

    A tag's value at a step the event files already hold is dropped (so is
    every other kind of summary's).

    Args:
      split: ``train`` or ``eval`` (any subdirectory name works).
      values: Tag name to value.
      step: The global step.
    """
    self._queue("scalar", split, values, step)

  def histograms(self, split: str, values: dict[str, Any], step: int) -> None:
    """Queues histograms of arrays (tag name to array) at ``step``."""
    self._queue("histogram", split, values, step)

  def images(self, split: str, values: dict[str, Any], step: int) -> None:
    """Queues images (tag name to uint8/float ``[k, H, W, C]``) at ``step``."""
    self._queue("image", split, values, step)

  def hparams(self, values: dict[str, Any], *, trial_id: str) -> None:
    """Writes the run's hyper-parameters for TensorBoard's HParams tab.

    Written once per run directory: a resumed run finds them already there.
    Metrics need no declaration: the tab shows the scalars of the run's
    subdirectories (``test/accuracy``, ``train/loss``, ...).

    Args:
      values: Name to bool, int, float or str.
      trial_id: The run's name in the HParams table.
    """
    if not self.enabled or HPARAMS_TAG in self._last_written(""):
      return
    with self._writer("").as_default():
      hparams_api.hparams(values, trial_id=trial_id, start_time_secs=None)
    self._writer("").flush()
    self._written[""][HPARAMS_TAG] = 0

  def commit(self) -> None:
    """Writes everything queued and flushes the event files."""
    if not self.enabled:
      return
    for kind, split, name, value, step in self._pending:
      with self._writer(split).as_default():
        _WRITERS[kind](name, value, step)
    self._pending.clear()
    for writer in self._writers.values():
      writer.flush()

  def close(self) -> None:
    """Commits what is queued and closes the writers."""
    self.commit()
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()
