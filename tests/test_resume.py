"""Re-running a run directory: another experiment is refused with nothing
written, meaningful changes resume and are recorded, a finished run is left
as it is, and Ctrl-C stops cleanly."""

import hashlib
import json
import os
import signal

import pytest
import tensorflow as tf

from conftest import (read_scalars, run_in_process, signal_script_at,
                      write_image_folder)

# 512 training examples, batch 32, 3 epochs.
SMOKE = ["--flagfile=configs/smoke.flags"]


def _snapshot(root):
  digests = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, root)] = hashlib.sha256(
            f.read()).hexdigest()
  return digests


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("finished"))
  proc = run_in_process("train_loop.py", *SMOKE, f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  return model_dir


def _image_folder(tmp_path):
  folder = write_image_folder(str(tmp_path / "images"), per_class=12)
  return ["--dataset=folder", f"--data_dir={folder}", "--validation_size=4"]


# (flags of the re-run, the field and its old and new values as named).
REFUSED = {
    "seed": (["--seed=5"], "seed 1 -> 5"),
    "global_batch_size": (["--batch_size=64"], "global_batch_size 32 -> 64"),
    "dataset": (_image_folder, "dataset 'synthetic' -> 'folder'"),
    "synthetic_train_size": (["--synthetic_train_size=1024"],
                             "synthetic_train_size 576 -> 1024"),
    "model_l2": (["--l2=0.01"], "l2 0.0 -> 0.01"),
    "precision": (["--mixed_precision=mixed_bfloat16"],
                  "mixed_precision 'float32' -> 'mixed_bfloat16'"),
    "optimizer": (["--optimizer=sgd"], "optimizer 'adam' -> 'sgd'"),
    "schedule": (["--lr_schedule=cosine"], "lr_schedule 'constant' -> 'cosine'"),
    "augment": (["--augment"], "augment False -> True"),
    "cutout": (["--augment", "--cutout=8"], "cutout 0 -> 8"),
    "keep_short_batch": (["--keep_short_batch"],
                         "keep_short_batch False -> True"),
    "label_smoothing": (["--label_smoothing=0.1"],
                        "label_smoothing 0.0 -> 0.1"),
    "validation_size": (["--validation_size=32"], "validation_size 64 -> 32"),
    "best_metric": (["--best_metric=validation/accuracy"],
                    "best_metric None -> 'validation/accuracy'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_another_experiment_is_refused_and_nothing_is_written(
    tmp_path, finished_run, case):
  flags, named = REFUSED[case]
  if callable(flags):
    flags = flags(tmp_path)
  before = _snapshot(finished_run)
  proc = run_in_process("train_loop.py", *SMOKE, *flags,
                        f"--model_dir={finished_run}")
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert named in lines[0]
  assert f"--model_dir={finished_run} holds a run with another " \
         "configuration" in lines[0]
  assert "pass a new --model_dir (or --run_name)" in lines[0]
  assert "train step" not in proc.stdout
  assert _snapshot(finished_run) == before


def test_every_differing_field_is_named_in_the_one_line(tmp_path,
                                                        finished_run):
  proc = run_in_process("train_loop.py", *SMOKE, "--seed=5",
                        "--learning_rate=0.01", "--batch_size=64",
                        f"--model_dir={finished_run}")
  assert proc.returncode == 2
  line = proc.stderr.strip()
  assert "seed 1 -> 5" in line and "global_batch_size 32 -> 64" in line
  # A constant rate may change on resume: not a reason to refuse.
  assert "learning_rate" not in line


def test_a_finished_run_run_again_rewrites_nothing(finished_run):
  before = _snapshot(finished_run)
  proc = run_in_process("train_loop.py", *SMOKE, f"--model_dir={finished_run}")
  assert proc.returncode == 0, proc.stderr
  assert "the run already finished at step 48" in proc.stdout
  assert "train step" not in proc.stdout and "eval " not in proc.stdout
  assert _snapshot(finished_run) == before
  # Fewer epochs than trained: finished at once, nothing rewritten either.
  proc = run_in_process("train_loop.py", *SMOKE, "--epochs=1",
                        f"--model_dir={finished_run}")
  assert proc.returncode == 0, proc.stderr
  assert "the run already finished at step 48" in proc.stdout
  assert _snapshot(finished_run) == before


@pytest.mark.slow  # Two runs.
def test_more_epochs_train_exactly_the_added_steps_and_are_recorded(tmp_path):
  model_dir = str(tmp_path / "extended")
  assert run_in_process("train_loop.py", *SMOKE,
                        f"--model_dir={model_dir}").returncode == 0
  proc = run_in_process("train_loop.py", *SMOKE, "--epochs=5",
                        "--learning_rate=0.0005", f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  assert "at step 48/80" in proc.stdout
  trained = [line.split()[2] for line in proc.stdout.splitlines()
             if line.startswith("train step")]
  assert trained == ["56/80", "64/80", "72/80", "80/80"]
  with open(os.path.join(model_dir, "metrics.json")) as f:
    assert json.load(f)["global_step"] == 80
  losses = read_scalars(os.path.join(model_dir, "train"))["loss"]
  assert [s for s, _ in losses] == list(range(8, 81, 8))
  rates = dict(read_scalars(os.path.join(model_dir, "train"))[
      "learning_rate"])
  assert rates[48] == pytest.approx(0.001) and rates[49] == pytest.approx(
      0.0005)
  with open(os.path.join(model_dir, "run_record.json")) as f:
    first, second = json.load(f)["invocations"]
  assert first["config_changes"] == {}
  assert second["config_changes"] == {"epochs": [3, 5],
                                      "learning_rate": [0.001, 0.0005]}
  with open(os.path.join(model_dir, "config.json")) as f:
    assert json.load(f)["loop"]["epochs"] == 5


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_without_a_traceback_and_resumes(tmp_path):
  model_dir = str(tmp_path / "interrupted")
  args = [*SMOKE, "--epochs=4", "--noexport", f"--model_dir={model_dir}"]
  proc = signal_script_at("train step 24/", args, signal.SIGINT, timeout=120)
  out, err = proc.stdout, proc.stderr
  assert proc.returncode == 130, out + err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  last = out.strip().splitlines()[-1]
  saved = int(last.split()[3].split("/")[0])
  assert last == (f"interrupted at step {saved}/64; checkpoint saved; run "
                  f"the same command to resume")
  assert 24 <= saved < 64
  assert tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints")).endswith(f"ckpt-{saved}")
  assert not os.path.exists(os.path.join(model_dir, "metrics.json"))

  rerun = run_in_process("train_loop.py", *args)
  assert rerun.returncode == 0, rerun.stderr
  assert f"at step {saved}/64" in rerun.stdout
  with open(os.path.join(model_dir, "metrics.json")) as f:
    assert json.load(f)["global_step"] == 64
  steps = [s for s, _ in read_scalars(os.path.join(model_dir, "train"))["loss"]]
  assert steps == list(range(8, 65, 8))
