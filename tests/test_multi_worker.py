"""MultiWorkerMirroredStrategy through scripts/launch_local.py, on loopback.

Two workers are compared with two local replicas trained in the test process
within 1e-5: oneDNN's graph rewrites fuse kernels differently around
collective ops and local copies, which can change float32 results in the
last bit (the verifier turns them off to compare bitwise; training keeps
them on, as here).
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, SCRIPTS, read_scalars, run_in_process

# Worker processes on loopback.
pytestmark = pytest.mark.slow

SMOKE = ["--flagfile=configs/smoke.flags", "--deterministic"]


def _checkpoint_values(model_dir):
  """Every value of the latest checkpoint (the model's deeper weights are
  saved under the optimizer's shorter path)."""
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  return path, {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(path)
                if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _launch(tmp_path, *train_args, workers=2):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp_path / "tmp"))
  os.makedirs(env["TMPDIR"], exist_ok=True)
  return subprocess.Popen(
      [sys.executable, "-u", os.path.join(SCRIPTS, "launch_local.py"),
       f"--num_workers={workers}", "--", *train_args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _pids(line):
  match = re.search(r"\(pids (\d+), (\d+)\)", line)
  return [int(match.group(1)), int(match.group(2))] if match else None


def _signal_when(proc, is_cue, send, timeout):
  """Reads the launcher's output until `is_cue(line)`, calls `send(pids)`
  with the workers' pids, then waits at most `timeout` s for the launcher
  (a longer wait raises TimeoutExpired and fails the test).

  Returns (stdout, stderr, pids); the launcher is killed if it outlives
  this."""
  seen, pids = [], []
  try:
    for line in proc.stdout:
      seen.append(line)
      pids = _pids(line) or pids
      if is_cue(line):
        break
    assert pids, "the launcher did not report its workers"
    send(pids)
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return "".join(seen) + out, err, pids


# Batch norm synchronized over the workers (the default with replicas) and
# dropout: each worker's replica draws its own masks, as a local replica.
RESNET = ["--model=resnet", "--resnet_depth=8", "--dropout=0.2"]


def test_two_workers_match_two_local_replicas(tmp_path):
  # One epoch: 16 steps, 2 calls of 8, an evaluation and a checkpoint.
  mw_dir = str(tmp_path / "multi_worker")
  proc = _launch(tmp_path, *SMOKE, *RESNET, "--epochs=1",
                 f"--model_dir={mw_dir}")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, out + err
  assert "[worker 0] done" in out and "[worker 1] done" in out
  assert "CollectiveAllReduceStrategy x2" in out

  # The reference in this process (2 logical CPUs, oneDNN on as in the
  # workers).
  mirrored_dir = str(tmp_path / "mirrored")
  proc = run_in_process("train_loop.py", *SMOKE, *RESNET, "--epochs=1",
                        "--cpu_replicas=2", f"--model_dir={mirrored_dir}")
  assert proc.returncode == 0, proc.stderr
  path_a, a = _checkpoint_values(mw_dir)
  path_b, b = _checkpoint_values(mirrored_dir)
  assert path_a.endswith("ckpt-16") and path_b.endswith("ckpt-16")
  assert a.keys() == b.keys()
  assert len([k for k in a if "moving_mean" in k]) == 7
  assert a["rng/dropout0/.ATTRIBUTES/VARIABLE_VALUE"][1] == 16
  assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-5
  with open(os.path.join(mw_dir, "metrics.json")) as f:
    mw = json.load(f)
  with open(os.path.join(mirrored_dir, "metrics.json")) as f:
    mirrored = json.load(f)
  assert mw["global_step"] == 16 and mw["num_replicas"] == 2
  assert abs(mw["eval_loss"] - mirrored["eval_loss"]) <= 1e-5
  loss_a = read_scalars(os.path.join(mw_dir, "train"))["loss"]
  loss_b = read_scalars(os.path.join(mirrored_dir, "train"))["loss"]
  assert [s for s, _ in loss_a] == [s for s, _ in loss_b]
  assert max(abs(x - y) for (_, x), (_, y) in zip(loss_a, loss_b)) <= 1e-5

  # One set of outputs: only the chief wrote events; no worker leftovers.
  for split in ("train", "test"):
    assert len(os.listdir(os.path.join(mw_dir, split))) == 1
  assert os.listdir(tmp_path / "tmp") == []


def test_sigterm_ctrl_c_then_sigkill_on_one_worker(tmp_path):
  """SIGTERM to the launcher: both workers save the same step and exit 143.
  The rerun resumes; SIGINT to worker 1 alone: the vote makes both save
  the same step and exit 130 (interrupted), and the launcher with them, each
  step logged once. The last rerun resumes again; SIGKILL to worker 1 there:
  the launcher stops the job within 60 s, saying why, and no worker is left
  (a survivor would wait on its peer's collectives for ever)."""
  model_dir = str(tmp_path / "preempted")
  # 80 steps, no evaluation (the test above evaluates): none to trace.
  args = [*SMOKE, "--epochs=5", "--eval_sets=", f"--model_dir={model_dir}"]
  proc = _launch(tmp_path, *args)
  out, err, _ = _signal_when(
      proc, lambda line: line.startswith("[worker 0] train step 24/"),
      lambda pids: proc.send_signal(signal.SIGTERM), timeout=120)
  assert proc.returncode == 143, out + err
  assert "[worker 0] stopped by SIGTERM at step" in out
  assert "[worker 1] stopped by SIGTERM at step" in out
  saved = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
  assert 24 <= saved < 80 and saved % 8 == 0
  assert tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints")).endswith(f"ckpt-{saved}")
  assert not os.path.exists(os.path.join(model_dir, "metrics.json"))

  def _step(line):
    return int(re.search(r"train step (\d+)/", line).group(1))

  proc = _launch(tmp_path, *args)
  out, err, _ = _signal_when(
      proc, lambda line: (line.startswith("[worker 1] train step")
                          and _step(line) > saved),
      lambda pids: os.kill(pids[1], signal.SIGINT), timeout=120)
  assert proc.returncode == 130, out + err
  assert f"at step {saved}/80" in out  # Resumed.
  steps = {int(s) for s in re.findall(
      r"\[worker \d\] interrupted at step (\d+)/80; checkpoint saved", out)}
  assert len(steps) == 1 and "[worker 0] interrupted" in out, out
  (interrupted,) = steps
  assert interrupted > saved
  assert "Traceback" not in out + err
  assert tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints")).endswith(f"ckpt-{interrupted}")

  steps = [s for s, _ in read_scalars(os.path.join(model_dir, "train"))["loss"]]
  assert steps == list(range(8, interrupted + 1, 8))
  assert os.listdir(tmp_path / "tmp") == []

  proc = _launch(tmp_path, *args)
  out, err, pids = _signal_when(
      proc, lambda line: line.startswith("[worker 1] train step"),
      lambda pids: os.kill(pids[1], signal.SIGKILL), timeout=60)
  assert f"at step {interrupted}/80" in out  # Resumed again.
  assert proc.returncode != 0
  assert "error: worker 1 exited with status -9 (killed by SIGKILL)" in err
  assert not any(_alive(pid) for pid in pids)
