"""Runs a script and kills its own process (SIGKILL) at a chosen instant.

  python tests/kill_at.py POINT SCRIPT [ARGS...]

For the tests of what a run killed while it writes leaves behind
(test_interrupted_writes.py). A signal sent from outside cannot hit these
instants reliably: they last microseconds. POINT is one of:

  write:NAME       while the run writes its JSON file NAME (research.files.
                   write_json): the new version half-written beside it,
                   before it replaces the old one
  publish          when the new export is written in full, before it
                   replaces the previous one (research.export._publish)
  between_renames  on a system without the atomic swap, between the two
                   renames that replace the previous export
"""

import json
import os
import runpy
import signal
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from research import export  # noqa: E402
from research import files  # noqa: E402


def _die() -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_while_writing(name: str) -> None:
  real = files.write_json

  def write_json(path, payload):
    if os.path.basename(path) == name:
      text = json.dumps(payload, indent=2, sort_keys=True, default=str)
      with open(path + ".tmp", "w") as f:
        f.write(text[:len(text) // 2])
      _die()
    real(path, payload)

  # The modules that write run files take write_json by name when they are
  # imported, which the scripts do only after this.
  for module in ("research.train", "research.run_record"):
    assert module not in sys.modules, module
  files.write_json = write_json


def _kill_between_renames() -> None:
  export._exchange = lambda a, b: False  # pylint: disable=protected-access
  real = os.rename

  def rename(src, dst, **kwargs):
    real(src, dst, **kwargs)
    if os.path.basename(os.fsdecode(dst)).startswith(".export.old-"):
      _die()

  os.rename = rename


def main(point: str, script: str, *args: str) -> None:
  if point.startswith("write:"):
    _kill_while_writing(point.split(":", 1)[1])
  elif point == "publish":
    export._publish = lambda tmp, export_dir: _die()  # pylint: disable=protected-access
  elif point == "between_renames":
    _kill_between_renames()
  else:
    raise SystemExit(f"unknown point {point!r}")
  sys.argv = [script, *args]
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main(*sys.argv[1:])
