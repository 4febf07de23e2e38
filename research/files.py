"""Small, crash-safe file writes (and JSON reads) shared by the loop and
the scripts."""

from __future__ import annotations

import json
import os

from research.errors import UserError


def read_json(path: str, *, fix: str):
  """The JSON in ``path``, or None if there is no such file.

  Raises:
    UserError: naming the file and ``fix`` if it cannot be read or parsed.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); {fix}") from None


def write_json(path: str, payload) -> None:
  """Writes JSON atomically: a crash never leaves a half-written file.

  Args:
    path: The file to write (replaced whole if it exists).
    payload: What to write (values JSON cannot hold are written as str).

  Raises:
    UserError: if the file cannot be written (no such folder, no space,
      no permission); ``path`` is then unchanged.
  """
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True, default=str)
      f.write("\n")
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise UserError(f"could not write {path} ({e.strerror or e}); check that "
                    f"its folder exists, is writable and has space") from None
