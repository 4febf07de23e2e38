"""Saving and restoring training state with ``tf.train.CheckpointManager``.

TensorFlow writes a checkpoint's files first and only then points the
``checkpoint`` state file at it (an atomic rename), so a crash during a save
leaves the previous checkpoint as the latest, and a save that fails (a full
disk) leaves the earlier ones intact. ``restore_latest`` additionally falls
back to an older checkpoint when the newest cannot be read, and refuses a
checkpoint of a different model without touching anything.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid

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
    if not candidates:
      return None
    errors = []
    for path in candidates:
      try:
        mismatch = self._shape_mismatch(path)
        if mismatch:
          # Not damage: the run directory belongs to another model (older
          # checkpoints are of the same one), so refuse before restoring.
          raise UserError(
              f"{self.directory} holds a checkpoint of a different model "
              f"({mismatch}); use another --model_dir")
        status = self.checkpoint.restore(path)
        status.assert_existing_objects_matched()
        if errors:
          logging.warning("restored the older checkpoint %s", path)
        return path
      except (tf.errors.OpError, ValueError, AssertionError, IndexError,
              EOFError) as e:
        errors.append((path, e))
      logging.warning("checkpoint %s is unreadable (%s: %s); falling back to "
                      "the previous one", path, type(errors[-1][1]).__name__,
                      _first_line(errors[-1][1]))
    raise UserError(
        f"no checkpoint in {self.directory} can be restored ("
        + "; ".join(f"{os.path.basename(p)}: {_first_line(e)}"
                    for p, e in errors)
        + "); use a new --model_dir or remove the damaged files")

  def _shape_mismatch(self, path: str) -> str | None:
    """Describes a variable whose shape differs from the checkpoint's."""
    # Our own variables' keys and shapes, from a checkpoint of them written
    # to memory (the same object graph gives the same keys).
    probe = f"ram://checkpoint_probe/{uuid.uuid4().hex}/ckpt"
    try:
      ours = _shapes(self.checkpoint.write(probe))
    finally:
      tf.io.gfile.rmtree(os.path.dirname(probe))
    theirs = _shapes(path)
    for key, shape in ours.items():
      if key in theirs and list(theirs[key]) != list(shape):
        name = key.replace("/.ATTRIBUTES/VARIABLE_VALUE", "")
        return (f"{name} has shape {list(theirs[key])} there but "
                f"{list(shape)} here")
    return None

  def latest(self) -> str | None:
    """The newest checkpoint of the run (None on a non-chief worker, whose
    saves are thrown away, or before the first save)."""
    return self.manager.latest_checkpoint if self.is_chief else None

  def save(self, step: int) -> str:
    """Saves a checkpoint numbered ``step``.

    Returns:
      The saved checkpoint's path (on a non-chief worker, a removed temporary
      path).

    Raises:
      UserError: if the save fails (a full or read-only disk).
    """
    if self.is_chief:
      try:
        return self.manager.save(checkpoint_number=step)
      except (tf.errors.OpError, OSError) as e:
        raise UserError(
            f"could not save the checkpoint of step {step} in "
            f"{self.directory} ({_first_line(e)}); the earlier checkpoints "
            f"are intact: free space or fix the folder, then re-run the "
            f"same command to resume") from None
    scratch = tempfile.mkdtemp(prefix="worker_ckpt_")
    try:
      return self.checkpoint.write(os.path.join(scratch, f"ckpt-{step}"))
    finally:
      shutil.rmtree(scratch, ignore_errors=True)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:200] if text else type(error).__name__


def _shapes(prefix: str) -> dict[str, list[int]]:
  # A reader on the exact prefix (list_variables would treat a ram://
  # prefix as a directory).
  reader = tf.compat.v1.train.NewCheckpointReader(prefix)
  return reader.get_variable_to_shape_map()
