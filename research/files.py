"""Small, crash-safe file writes shared by the loop and the scripts."""

from __future__ import annotations

import json
import os


def write_json(path: str, payload) -> None:
  """Writes JSON atomically: a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)
