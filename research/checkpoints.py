"""Saving and restoring training state with ``tf.train.CheckpointManager``.

TensorFlow writes a checkpoint's files first and only then points the
``checkpoint`` state file at it (an atomic rename), so a crash during a save
leaves the previous checkpoint as the latest. ``restore_latest`` additionally
falls back to an older checkpoint when the newest cannot be read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import tensorflow as tf

from research.errors import UserError


class CheckpointKeeper:
  """Keeps the checkpoints of one run.

  On a non-chief worker of a multi-worker job, saving must still happen (the
  save is collective), but into a private temporary directory that is removed
  right after.
  """

  def __init__(self, *, checkpoint: tf.train.Checkpoint, directory: str,
               max_to_keep: int = 3, is_chief: bool = True):
    """Args:
      checkpoint: What to save (model, optimizer, counters).
      directory: ``<model_dir>/checkpoints``.
      max_to_keep: Number of newest checkpoints kept; must be >= 1.
      is_chief: Whether this process owns ``directory``.

    Raises:
      ValueError: if ``max_to_keep`` < 1.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.checkpoint = checkpoint
    self.directory = directory
    self.is_chief = is_chief
    self.manager = tf.train.CheckpointManager(
        checkpoint, directory, max_to_keep=max_to_keep)

  def restore_latest(self) -> str | None:
    """Restores the newest readable checkpoint.

    Returns:
      Its path, or None when there is none (a fresh run).

    Raises:
      UserError: if checkpoints exist but none can be restored into this
        model (for example, one of a different architecture).
    """
    candidates = list(reversed(self.manager.checkpoints))
    errors = []
    for path in candidates:
      try:
        status = self.checkpoint.restore(path)
        status.assert_existing_objects_matched()
        return path
      except (tf.errors.OpError, ValueError, AssertionError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        errors.append(f"{os.path.basename(path)}: {type(e).__name__} "
                      f"{first_line[:200]}")
        logging.warning("checkpoint %s is unusable (%s); trying an older one",
                        path, first_line[:200])
    if candidates:
      raise UserError(
          f"no checkpoint in {self.directory} can be restored into this model "
          f"({'; '.join(errors)}); use a new --model_dir or remove that one")
    return None

  def save(self, step: int) -> str:
    """Saves a checkpoint numbered ``step``.

    Returns:
      The saved checkpoint's path (on a non-chief worker, a removed temporary
      path).
    """
    if self.is_chief:
      return self.manager.save(checkpoint_number=step)
    scratch = tempfile.mkdtemp(prefix="worker_ckpt_")
    try:
      return self.checkpoint.write(os.path.join(scratch, f"ckpt-{step}"))
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
