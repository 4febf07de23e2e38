"""Saving and restoring training state with ``tf.train.CheckpointManager``.

TensorFlow writes a checkpoint's files first and only then points the
``checkpoint`` state file at it (an atomic rename), so a crash during a save
leaves the previous checkpoint as the latest, and a save that fails (a full
disk) leaves the earlier ones intact. ``restore_latest`` additionally falls
back to an older checkpoint when the newest cannot be read, and refuses a
checkpoint of a different model without touching anything.

The checks every reader of checkpoints uses (the trainer's resume,
scripts/export.py, scripts/predict.py on an export's variables) live here
too: ``read_state`` (the state file), ``check_checkpoint_files`` (the files
exist and open, nothing read) and ``check_checkpoint`` (every tensor read);
each names the bad file in one line.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import uuid

import tensorflow as tf

from research import data as data_lib
from research.errors import UserError

# The file in a checkpoint directory that names its checkpoints (written by
# CheckpointManager, atomically, after the checkpoint's own files).
# Where a run directory keeps its checkpoints.
CHECKPOINTS_SUBDIR = "checkpoints"
STATE_FILE = "checkpoint"


def checkpoint_number(prefix: str) -> int:
  """N of a ``.../ckpt-N`` prefix (-1 for another name)."""
  tail = prefix.rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else -1


def checkpoints_in(directory: str) -> list[str]:
  """The checkpoint prefixes (``ckpt-N``) found in ``directory`` (by their
  ``.index`` files, whatever the state file says), oldest first."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  prefixes = [os.path.join(directory, n[:-len(".index")]) for n in names
              if n.endswith(".index")]
  return sorted(prefixes, key=lambda p: (checkpoint_number(p), p))


def read_state(directory: str, *, fix: str):
  """Reads and checks the state file of a checkpoint directory.

  TensorFlow's own reader logs a damaged state file and returns nothing (so
  a trainer would start from scratch over the checkpoints it has) or raises
  from ``CheckpointManager``'s constructor; this names the file instead.

  Args:
    directory: The checkpoint directory.
    fix: How to fix a damaged state file, the end of the message.

  Returns:
    The parsed ``CheckpointState``, or None when there is no state file
    (nothing was ever saved there).

  Raises:
    UserError: naming the state file, if it is not a readable file, cannot
      be parsed, or names no checkpoint.
  """
  state = os.path.join(directory, STATE_FILE)
  if not os.path.lexists(state):
    return None
  shown = data_lib.display_path(state)
  data_lib.require_utf8_path(state, "checkpoint state file")
  data_lib.check_readable_file(state, what="checkpoint state file", fix=fix)
  tf_logger = logging.getLogger("tensorflow")
  level = tf_logger.level
  tf_logger.setLevel(logging.ERROR)
  try:
    parsed = tf.train.get_checkpoint_state(directory)
  except Exception as e:  # pylint: disable=broad-except
    # ValueError (no path in it), UnicodeDecodeError (random bytes),
    # OpError: all mean a damaged state file.
    raise UserError(f"checkpoint state file {shown} is damaged "
                    f"({data_lib.describe_error(e)}); {fix}") from None
  finally:
    tf_logger.setLevel(level)
  if parsed is None or not parsed.model_checkpoint_path:
    raise UserError(f"checkpoint state file {shown} is damaged (it names no "
                    f"checkpoint); {fix}")
  return parsed


def check_checkpoint_files(prefix: str, *, what: str = "checkpoint",
                           fix: str = "pass another --checkpoint"
                           ) -> list[str]:
  """Checks that a checkpoint's files exist and can be opened, without
  reading them (TensorFlow would wait forever on a FIFO, and names no file
  when one is missing or unreadable).

  Args:
    prefix: The checkpoint's path prefix (``.../ckpt-8``).
    what: What the checkpoint is, for messages.
    fix: How to fix a bad checkpoint, the end of every message.

  Returns:
    Its data files.

  Raises:
    UserError: naming the file, if the index or every data file is missing,
      a file is not a regular file or cannot be opened, the index is empty,
      or the path is not valid UTF-8.
  """
  shown = data_lib.display_path(prefix)
  data_lib.require_utf8_path(prefix, what)
  index = prefix + ".index"
  if not os.path.lexists(index):
    raise UserError(f"{what} {shown} does not exist (no "
                    f"{data_lib.display_path(os.path.basename(index))}); "
                    f"{fix}")
  data_lib.check_readable_file(index, what=f"{what} index", fix=fix)
  shards = sorted(glob.glob(glob.escape(prefix) + ".data-*-of-*"))
  if not shards:
    raise UserError(f"{what} data file {shown}.data-00000-of-00001 does not "
                    f"exist; {fix}")
  for shard in shards:
    # A shard may be empty (no tensor of this checkpoint landed in it).
    data_lib.check_readable_file(shard, what=f"{what} data file", fix=fix,
                                 allow_empty=True)
  return shards


def check_checkpoint(prefix: str, *, what: str = "checkpoint",
                     fix: str = "pass another --checkpoint") -> None:
  """Reads a whole checkpoint (index and every tensor), naming a bad file.

  TensorFlow's restore reports a damaged file without saying which of the
  checkpoint's files it is, sometimes as a bare ``IndexError``; reading each
  file here first names it.

  Args:
    prefix: The checkpoint's path prefix (``.../ckpt-8``,
      ``<export>/variables/variables``).
    what: What the checkpoint is, for messages.
    fix: How to fix a bad checkpoint, the end of every message.

  Raises:
    UserError: naming the file, if the index or a data file is missing, not
      a file, unreadable or damaged, or the path is not valid UTF-8.
  """
  shards = check_checkpoint_files(prefix, what=what, fix=fix)
  index = prefix + ".index"
  try:
    reader = tf.train.load_checkpoint(prefix)
    keys = reader.get_variable_to_shape_map()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{what} index {data_lib.display_path(index)} is damaged "
                    f"({data_lib.describe_error(e)}); {fix}") from None
  try:
    for key in keys:
      reader.get_tensor(key)
  except Exception as e:  # pylint: disable=broad-except
    # IndexError (a truncated file), DataLossError (a checksum): the data.
    names = ", ".join(data_lib.display_path(s) for s in shards)
    raise UserError(f"{what} data file {names} is damaged "
                    f"({data_lib.describe_error(e)}); {fix}") from None


class _OtherModel(Exception):
  """The run directory's checkpoints are of another model."""


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
    data_lib.require_utf8_path(directory, "checkpoint folder")
    read_state(directory, fix=_state_fix(directory))
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
    fix = ("remove that checkpoint's files to resume from an older one (or "
           "from scratch), or use a new --model_dir")
    problems = []
    for path in candidates:
      try:
        # Named problems first: TensorFlow would wait forever on a FIFO and
        # names no file when one is missing or unreadable.
        check_checkpoint_files(path, fix=fix)
        mismatch = self._shape_mismatch(path)
        if mismatch:
          # Not damage: the run directory belongs to another model (older
          # checkpoints are of the same one), so refuse before restoring.
          raise _OtherModel(
              f"{data_lib.display_path(self.directory)} holds a checkpoint "
              f"of a different model ({mismatch}); use another --model_dir")
        self.checkpoint.restore(path).assert_existing_objects_matched()
        if problems:
          logging.warning("restored the older checkpoint %s", path)
        return path
      except _OtherModel as e:
        raise UserError(str(e)) from None
      except UserError as e:
        problems.append(str(e))
      except (tf.errors.OpError, ValueError, AssertionError, IndexError,
              EOFError) as e:
        # Damaged contents: reading every tensor names the file.
        try:
          check_checkpoint(path, fix=fix)
          problems.append(f"checkpoint {data_lib.display_path(path)} cannot "
                          f"be restored ({data_lib.describe_error(e)}); {fix}")
        except UserError as named:
          problems.append(str(named))
      logging.warning("%s; falling back to the previous checkpoint",
                      problems[-1])
    if len(problems) == 1:
      raise UserError(problems[0])
    raise UserError(f"no checkpoint in {data_lib.display_path(self.directory)}"
                    f" can be restored: " + " / ".join(problems))

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
            f"{self.directory} ({data_lib.describe_error(e)}); the earlier "
            f"checkpoints are intact: free space or fix the folder, then "
            f"re-run the same command to resume") from None
    scratch = tempfile.mkdtemp(prefix="worker_ckpt_")
    try:
      return self.checkpoint.write(os.path.join(scratch, f"ckpt-{step}"))
    finally:
      shutil.rmtree(scratch, ignore_errors=True)


def _state_fix(directory: str) -> str:
  """How to repair a damaged state file so that the run resumes."""
  found = checkpoints_in(directory)
  state = data_lib.display_path(os.path.join(directory, STATE_FILE))
  if not found:
    return "no checkpoint is beside it: remove it to start from scratch"
  newest = data_lib.display_path(os.path.basename(found[-1]))
  return (f"to resume from the newest checkpoint beside it, write its name "
          f"into it: printf 'model_checkpoint_path: \"{newest}\"\\n' > "
          f"{state}")


def _shapes(prefix: str) -> dict[str, list[int]]:
  # A reader on the exact prefix (list_variables would treat a ram://
  # prefix as a directory).
  reader = tf.compat.v1.train.NewCheckpointReader(prefix)
  return reader.get_variable_to_shape_map()
