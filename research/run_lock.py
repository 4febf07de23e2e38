"""One writer per run directory: an OS lock held for the whole run.

The chief of a training run takes an exclusive ``fcntl.flock`` on
``<model_dir>/.lock`` before it writes anything, and keeps it until the run
ends. The kernel releases it when the process dies in any way (SIGKILL
included), so a lock never outlives its holder and never blocks a resume.
The holder writes its host, process id, start time and command line into the
file, so a second trainer can say who holds the run. Readers (TensorBoard,
``scripts/export.py``, ``predict.py``, evaluators) take no lock.

On a filesystem without ``flock`` (some network filesystems), the run goes on
unlocked after a warning: nothing then stops a second trainer.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket

from research.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
  """The exclusive lock of one run directory (a context manager)."""

  def __init__(self, model_dir: str, *, command: str = "",
               holder: str = "trainer", named: str | None = None):
    """Args:
      model_dir: The run directory (created if missing), or the folder of
        another sole writer (a sidecar evaluator's).
      command: The holder's command line (shell-quoted), recorded for the
        message of a process refused while it holds the lock; "" records
        only its host, pid and start.
      holder: What holds the lock, for that message.
      named: How that message names ``model_dir`` (default:
        ``--model_dir=<model_dir>``, which it then advises changing).
    """
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.model_dir = model_dir
    self.command = command
    self.holder = holder
    self.named = named
    self._file = None

  def acquire(self) -> None:
    """Takes the lock and records the holder.

    Raises:
      UserError: if another process holds the lock (naming it).
    """
    os.makedirs(self.model_dir, exist_ok=True)
    # "a+" creates the file if need be and changes nothing if it exists, so
    # a refused trainer leaves the directory as it was.
    lock_file = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        lock_file.seek(0)
        holder = " ".join(lock_file.read().split()) or "another process"
        lock_file.close()
        raise UserError(
            f"{self.named or f'--model_dir={self.model_dir}'} is in use by "
            f"another {self.holder} ({holder}); wait for it to finish or "
            f"stop it" + ("" if self.named else ", or pass another "
                          "--model_dir")) from None
      # ENOLCK, EOPNOTSUPP, ...: this filesystem cannot lock.
      logging.warning("cannot lock %s (%s): the filesystem does not support "
                      "locks; make sure no other trainer uses this run",
                      self.path, os.strerror(e.errno))
      self._file = lock_file
      return
    lock_file.seek(0)
    lock_file.truncate()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    lock_file.write(f"host {socket.gethostname()}, pid {os.getpid()}, "
                    f"started {started}"
                    f"{': ' + self.command if self.command else ''}\n")
    lock_file.flush()
    self._file = lock_file

  def release(self) -> None:
    """Releases the lock (closing the file releases it)."""
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
