"""scripts/time_to_accuracy.py (make bench-tta): two configs trained
alternately in fresh processes, their recorded numbers compared."""

import json
import os
import tempfile

import pytest

from conftest import run_in_process

pytestmark = pytest.mark.slow  # Trains in two processes.

# For both configs: 96 training examples (32 held out), batch 32: 3 steps
# an epoch.
TINY = ["--synthetic_train_size=128", "--validation_size=32",
        "--synthetic_test_size=32", "--eval_images=0"]


def test_two_configs_timed_side_by_side_from_their_own_metrics(
    tmp_path, monkeypatch):
  # A candidate that trains two epochs of the smoke config's three and
  # evaluates only at the end (--eval_sets= : none during training).
  candidate = tmp_path / "two_epochs.flags"
  candidate.write_text("--flagfile=configs/smoke.flags\n--epochs=2\n"
                       "--eval_sets=\n")
  work_dir = tmp_path / "runs"
  out = tmp_path / "tta.json"
  proc = run_in_process(
      "time_to_accuracy.py", "--baseline=configs/smoke.flags",
      f"--candidate={candidate}", "--seeds=3", f"--work_dir={work_dir}",
      f"--json_out={out}", "--", *TINY)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  runs = {os.path.basename(r["model_dir"]): r for r in report["runs"]}
  for name, steps in (("smoke_s3", 9), ("two_epochs_s3", 6)):
    metrics = json.loads((work_dir / name / "metrics.json").read_text())
    # The flags after -- and the seed reached the run.
    assert metrics["global_step"] == steps
    assert runs[name]["seed"] == 3
    assert runs[name]["training_seconds"] == metrics["wall_seconds"]
    assert runs[name]["test_accuracy"] == metrics["eval_accuracy"]
    assert runs[name]["process_seconds"] > metrics["wall_seconds"]
    assert os.path.isfile(work_dir / f"{name}.log")
    assert not os.path.exists(work_dir / name / "export")  # --noexport
  summary = report["summary"]
  assert summary["ratio"] == pytest.approx(
      runs["two_epochs_s3"]["training_seconds"] /
      runs["smoke_s3"]["training_seconds"])
  assert f"ratio of training seconds, two_epochs / smoke: " \
         f"{summary['ratio']:.3f}" in proc.stdout
  assert "| smoke | 3 |" in proc.stdout and "| two_epochs | 3 |" in proc.stdout
  log = (work_dir / "two_epochs_s3.log").read_text()
  assert "eval validation step 3/6" not in log
  assert "eval validation step 6/6" in log and "eval test step 6/6" in log

  # The same folder again: refused before anything trains.
  proc = run_in_process(
      "time_to_accuracy.py", "--baseline=configs/smoke.flags",
      f"--candidate={candidate}", "--seeds=3", f"--work_dir={work_dir}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {work_dir} already holds smoke_s3, two_epochs_s3: pass a new "
      f"--work_dir (or none, for a fresh folder), or delete them")
  assert "| smoke |" not in proc.stdout
  proc = run_in_process("time_to_accuracy.py", "--seeds=1,1")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --seeds needs distinct seeds, at least one; got ['1', '1']")

  # A run that fails: one error line naming its log; nothing else trained.
  # (No --work_dir: a fresh folder, here under tmp_path.)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  broken = tmp_path / "broken.flags"
  broken.write_text("--flagfile=configs/smoke.flags\n--epochs=0\n")
  proc = run_in_process(
      "time_to_accuracy.py", f"--baseline={broken}",
      f"--candidate={candidate}", "--seeds=3", "--", *TINY)
  assert proc.returncode == 1
  line = proc.stderr.strip().splitlines()[-1]
  fresh = proc.stdout.splitlines()[0].removeprefix("runs and logs: ")
  assert line.startswith("error: broken_s3 exited 2: error: ") and \
      f"(log: {fresh}/broken_s3.log)" in line, line
  assert not os.path.exists(os.path.join(fresh, "two_epochs_s3"))
