"""Where a result came from: command, versions, code, devices.

Each start of a run (the first and every resume) appends one record to
``<model_dir>/run_record.json``, so a number can be traced back to the exact
command and code that produced it, and rerun.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import uuid
from typing import Sequence

from research.files import write_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_RECORD_FILE = "run_record.json"


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True,
                         text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_state() -> dict:
  """The code's commit and whether the working tree differs from it.

  Returns:
    ``{"commit": sha or None, "dirty": bool or None}`` (None outside a git
    checkout, or without git).
  """
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit or None,
          "dirty": None if status is None else bool(status)}


def collect(argv: Sequence[str]) -> dict:
  """This process's record: command line, versions, git state, devices.

  Args:
    argv: The command's arguments (``sys.argv``).

  Returns:
    A JSON-serializable dict.
  """
  import keras  # Imported here: the record is taken after TF is loaded.
  import numpy as np
  import tensorflow as tf
  devices = [{"name": d.name, "type": d.device_type}
             for d in tf.config.list_logical_devices()]
  physical = [{"name": d.name, "type": d.device_type}
              for d in tf.config.list_physical_devices()]
  return {
      "command": shlex.join([sys.executable, *argv]),
      "cwd": os.getcwd(),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "host": socket.gethostname(),
      "platform": platform.platform(),
      "versions": {"python": platform.python_version(),
                   "tensorflow": tf.__version__, "keras": keras.__version__,
                   "numpy": np.__version__},
      "git": git_state(),
      "physical_devices": physical,
      "logical_devices": devices,
      "tf_config": os.environ.get("TF_CONFIG"),
  }


def append(model_dir: str, record: dict) -> None:
  """Adds ``record`` to ``<model_dir>/run_record.json`` (atomically).

  A record file that cannot be read as one (damaged by something else:
  ours are replaced whole) is kept beside it, renamed, rather than
  overwritten, and a warning names both.
  """
  path = os.path.join(model_dir, RUN_RECORD_FILE)
  records = []
  if os.path.lexists(path):
    try:
      with open(path, encoding="utf-8") as f:
        records = json.load(f)["invocations"]
      if not isinstance(records, list):
        raise TypeError("invocations is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
      kept = f"{path}.damaged-{uuid.uuid4().hex[:8]}"
      os.rename(path, kept)
      logging.warning("%s could not be read (%s); kept it as %s and started "
                      "a new record", path, e, kept)
      records = []
  records.append(record)
  write_json(path, {"invocations": records})
