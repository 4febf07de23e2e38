"""One writer per run directory (research/run_lock.py)."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPTS, run_in_process
from research.errors import UserError
from research.run_lock import RunLock

SMOKE = ["--flagfile=configs/smoke.flags"]


def _snapshot(root):
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        out[os.path.relpath(os.path.join(folder, name), root)] = (
            hashlib.sha256(f.read()).hexdigest())
  return out


def test_a_held_run_is_refused_naming_its_holder_and_left_untouched(
    tmp_path):
  model_dir = str(tmp_path / "run")
  with RunLock(model_dir, command="train_loop.py --flag=1"):
    before = _snapshot(model_dir)
    proc = run_in_process("train_loop.py", *SMOKE,
                          f"--model_dir={model_dir}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"error: --model_dir={model_dir} is in use by "
                           f"another trainer (host ")
    assert f"pid {os.getpid()}" in line
    assert "train_loop.py --flag=1" in line
    assert "\n" not in line and "train step" not in proc.stdout
    assert _snapshot(model_dir) == before
  # Released: the same command now runs.
  assert run_in_process("train_loop.py", *SMOKE, "--epochs=1",
                        f"--model_dir={model_dir}").returncode == 0


def test_the_lock_is_released_on_every_way_out(tmp_path):
  lock = RunLock(str(tmp_path))
  lock.acquire()
  with pytest.raises(UserError, match="in use by another trainer"):
    RunLock(str(tmp_path)).acquire()
  lock.release()
  with RunLock(str(tmp_path)):
    pass
  # A run that fails after taking it (a bad rate: non-finite at once)
  # releases it too.
  run_in_process("train_loop.py", *SMOKE, "--learning_rate=1e30",
                 f"--model_dir={tmp_path / 'nan'}")
  with RunLock(str(tmp_path / "nan")):
    pass


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(
    tmp_path, monkeypatch, caplog):
  from research import run_lock

  def no_locks(*args):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
  with RunLock(str(tmp_path)), RunLock(str(tmp_path)):
    pass  # Nothing can stop a second holder there.
  assert "the filesystem does not support locks" in caplog.text


@pytest.mark.slow
def test_a_second_trainer_on_a_running_run_exits_2_and_the_first_finishes(
    tmp_path):
  """The double launch of the issue: the first trainer a real process,
  paused (SIGSTOP) while the second tries, so it is sure to hold the run
  then, however slow the machine; the second in this process (a process of
  its own would only add a TensorFlow start: the lock is another process's
  either way)."""
  model_dir = str(tmp_path / "run")
  args = [sys.executable, "-u", os.path.join(SCRIPTS, "train_loop.py"),
          *SMOKE, f"--model_dir={model_dir}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stdout:
      if line.startswith("train step"):
        break
    first.send_signal(signal.SIGSTOP)
    try:
      second = run_in_process("train_loop.py", *SMOKE,
                              f"--model_dir={model_dir}")
    finally:
      first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=180)
  finally:
    if first.poll() is None:
      first.kill()
  assert second.returncode == 2, second.stderr
  last = second.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --model_dir={model_dir} is in use by "
                         f"another trainer")
  assert f"pid {first.pid}" in last and "Traceback" not in second.stderr
  assert first.returncode == 0, err
  with open(os.path.join(model_dir, "run_record.json")) as f:
    assert len(json.load(f)["invocations"]) == 1
  for split in ("train", "test"):
    assert len(os.listdir(os.path.join(model_dir, split))) == 1


def test_a_second_holder_is_told_the_folder_as_the_user_named_it(tmp_path):
  folder = str(tmp_path / "run" / "evaluator")
  named = f"the evaluator/ folder of --model_dir={tmp_path / 'run'}"
  with RunLock(folder, holder="evaluator", named=named):
    with pytest.raises(UserError) as e:
      RunLock(folder, holder="evaluator", named=named).acquire()
  message = str(e.value)
  assert message.startswith(f"{named} is in use by another evaluator (host ")
  assert f"pid {os.getpid()}, started " in message
  # No command was recorded, and no other --model_dir to pass.
  assert message.endswith("); wait for it to finish or stop it"), message
