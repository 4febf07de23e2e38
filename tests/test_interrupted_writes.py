"""Nothing lost on the way out: a run killed while it writes a file leaves
the previous version of that file whole, and the next run finishes the job.

Each kill comes at the worst instant, from inside the process
(tests/kill_at.py): the new version half-written (a JSON file) or written
in full but not yet in place (the export), or, on a system without the
atomic swap, between the two renames that replace the export.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_in_process
from research import export as export_lib

# 64 training examples (96 less 32 for validation), batch 32: 2 steps an
# epoch.
TINY = ["--flagfile=configs/smoke.flags", "--synthetic_train_size=96",
        "--validation_size=32", "--synthetic_test_size=32", "--deterministic"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A run that finished its one epoch: metrics, export, one record."""
  model_dir = str(tmp_path_factory.mktemp("finished") / "run")
  proc = run_in_process("train_loop.py", *TINY, "--epochs=1",
                        f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  return model_dir


def _copy(finished_run, tmp_path) -> str:
  model_dir = str(tmp_path / "run")
  shutil.copytree(finished_run, model_dir)
  return model_dir


def _kill_at(point: str, model_dir: str) -> None:
  """Resumes the run for a second epoch, killed at ``point``."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "kill_at.py"), point,
       os.path.join(REPO, "scripts", "train_loop.py"), *TINY, "--epochs=2",
       f"--model_dir={model_dir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def _resume(model_dir: str) -> dict:
  proc = run_in_process("train_loop.py", *TINY, "--epochs=2",
                        f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(model_dir, "metrics.json")) as f:
    return json.load(f)


def _tree(root: str) -> dict[str, bytes]:
  """Every file under ``root``: relative path -> contents."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _leftovers(model_dir: str) -> list[str]:
  return sorted(n for n in os.listdir(model_dir) if n.startswith(".export."))


def _serves(export_dir: str) -> np.ndarray:
  images = np.zeros((2, 32, 32, 3), np.uint8)
  serve = tf.saved_model.load(export_dir).signatures["serving_default"]
  return serve(images=tf.constant(images))["probabilities"].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run_record.json"])  # Every JSON file of
# a run (metrics.json, config.json, best/info.json, ...) is written by the
# same files.write_json.
def test_a_kill_while_a_json_file_is_written_keeps_the_previous_one(
    finished_run, tmp_path, name):
  model_dir = _copy(finished_run, tmp_path)
  path = os.path.join(model_dir, name)
  with open(path, "rb") as f:
    before = f.read()
  _kill_at(f"write:{name}", model_dir)
  with open(path + ".tmp") as f:  # The kill came mid-write.
    with pytest.raises(ValueError):
      json.load(f)
  with open(path, "rb") as f:
    assert f.read() == before
  json.loads(before)

  metrics = _resume(model_dir)
  assert metrics["global_step"] == 4
  with open(os.path.join(model_dir, "run_record.json")) as f:
    invocations = json.load(f)["invocations"]
  # The first run, the killed one if it got as far as recording itself,
  # and the resume.
  assert len(invocations) == (2 if name == "run_record.json" else 3)


@pytest.mark.slow
def test_a_kill_while_exporting_keeps_the_previous_export(finished_run,
                                                          tmp_path):
  model_dir = _copy(finished_run, tmp_path)
  export_dir = os.path.join(model_dir, export_lib.EXPORT_SUBDIR)
  before = _tree(export_dir)
  served = _serves(export_dir)
  _kill_at("publish", model_dir)
  assert _tree(export_dir) == before
  (unfinished,) = _leftovers(model_dir)  # The new one, not yet in place.
  assert unfinished.startswith(".export.tmp-")
  with open(os.path.join(model_dir, "metrics.json")) as f:
    assert json.load(f)["global_step"] == 2  # Written after the export.

  assert _resume(model_dir)["global_step"] == 4
  assert _leftovers(model_dir) == []
  assert np.abs(_serves(export_dir) - served).max() > 0  # The new weights.


@pytest.mark.slow
def test_a_kill_between_the_fallback_renames_is_repaired(finished_run,
                                                         tmp_path):
  """Without renameat2's swap (not Linux, or a filesystem without it), the
  previous export is moved aside first; a kill then leaves no export, and
  the next run or export puts the previous one back before anything else."""
  model_dir = _copy(finished_run, tmp_path)
  export_dir = os.path.join(model_dir, export_lib.EXPORT_SUBDIR)
  before = _tree(export_dir)
  _kill_at("between_renames", model_dir)
  assert not os.path.exists(export_dir)
  aside = [n for n in _leftovers(model_dir) if n.startswith(".export.old-")]
  assert len(aside) == 1
  assert _tree(os.path.join(model_dir, aside[0])) == before

  export_lib.recover_interrupted_export(export_dir)
  assert _tree(export_dir) == before
  assert _leftovers(model_dir) == []


def test_linux_swaps_the_export_in_one_step(tmp_path):
  new, current = tmp_path / "new", tmp_path / "current"
  new.mkdir()
  current.mkdir()
  (new / "v").write_text("2")
  (current / "v").write_text("1")
  swapped = export_lib._exchange(str(new), str(current))  # pylint: disable=protected-access
  if not sys.platform.startswith("linux"):
    assert not swapped
    return
  assert swapped  # Without it, the fallback's window would be in play.
  assert (current / "v").read_text() == "2"
  assert (new / "v").read_text() == "1"


def test_a_damaged_run_record_is_kept_aside_not_overwritten(tmp_path):
  from research import run_record
  path = tmp_path / run_record.RUN_RECORD_FILE
  path.write_text('{"invocations": [{"command": "first"}')  # Cut short.
  run_record.append(str(tmp_path), {"command": "second"})
  with open(path) as f:
    assert json.load(f) == {"invocations": [{"command": "second"}]}
  (kept,) = [p for p in os.listdir(tmp_path) if ".damaged-" in p]
  assert (tmp_path / kept).read_text() == '{"invocations": [{"command": "first"}'
  run_record.append(str(tmp_path), {"command": "third"})
  with open(path) as f:
    assert len(json.load(f)["invocations"]) == 2
