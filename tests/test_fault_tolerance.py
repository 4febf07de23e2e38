"""Never lose a run: exact resume after SIGKILL, checkpoint fallback, NaN
guard, determinism, and clear refusals of bad input."""

import hashlib
import json
import os
import pickle
import shutil
import signal
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPO, SCRIPTS, read_scalars, run_in_process,
                      signal_script_at, write_cifar_batches,
                      write_image_folder)
from research.run_lock import LOCK_FILE

# With an EMA of the weights: resume must restore it too, and evaluation
# (of the averages) must continue bitwise. The test set each epoch (not
# the config's small validation set): an evaluation long enough to be
# killed in. No export: these tests read checkpoints, curves and exit
# statuses (exports and kills: test_interrupted_writes.py), and an export is
# a second of CPU a run.
SMOKE = ["--flagfile=configs/smoke.flags", "--deterministic",
         "--ema_decay=0.9", "--eval_sets=test", "--noexport"]
TRAIN_STEPS = [8, 16, 24, 32, 40, 48]
EVAL_STEPS = [16, 32, 48]


def _checkpoint_values(model_dir):
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  return path, {name: reader.get_tensor(name)
                for name, _ in tf.train.list_variables(path)
                if not name.startswith("save_counter")
                and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _assert_bitwise_equal(dir_a, dir_b):
  path_a, a = _checkpoint_values(dir_a)
  path_b, b = _checkpoint_values(dir_b)
  assert os.path.basename(path_a) == os.path.basename(path_b)
  assert a.keys() == b.keys()
  assert any("conv1" in k for k in a)
  assert any(k.startswith("averaged_weights/") for k in a)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _assert_each_step_once(model_dir):
  train = read_scalars(os.path.join(model_dir, "train"))
  assert {"loss", "accuracy", "learning_rate", "grad_norm"} <= set(train)
  for tag in ("loss", "accuracy"):
    assert [s for s, _ in train[tag]] == TRAIN_STEPS, tag
  for tag in ("learning_rate", "grad_norm"):  # Logged at every step.
    assert [s for s, _ in train[tag]] == list(range(1, TRAIN_STEPS[-1] + 1))
  evals = read_scalars(os.path.join(model_dir, "test"))
  for tag in ("loss", "accuracy"):
    assert [s for s, _ in evals[tag]] == EVAL_STEPS, tag


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted deterministic smoke run."""
  model_dir = str(tmp_path_factory.mktemp("reference"))
  proc = run_in_process("train_loop.py", *SMOKE, "--synthetic_test_size=2048",
                        f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  return model_dir


@pytest.mark.slow
def test_sigkill_at_two_moments_then_rerun_is_bitwise_identical(
    tmp_path, reference_run):
  """Killed twice in a row, each time at another moment, each kill a fresh
  process resuming what the last saved; then run to the end. (A kill
  mid-epoch, between checkpoints: the ResNet's test below.)"""
  model_dir = str(tmp_path / "killed")
  args = [*SMOKE, "--synthetic_test_size=2048", f"--model_dir={model_dir}"]
  for kill_after in (
      "eval test step 16/48",  # summaries and the checkpoint are being written
      "train step 32/48",  # the epoch's evaluation is running
  ):
    killed = signal_script_at(kill_after, args, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    # The killed holder's lock file is left behind, but the kernel released
    # the lock: it never blocks the resume.
    with open(os.path.join(model_dir, LOCK_FILE)) as f:
      assert f"pid {killed.pid}" in f.read()
  proc = run_in_process("train_loop.py", *args)
  assert proc.returncode == 0, proc.stderr
  assert "resumed from" in proc.stdout
  # The killed runs are fresh processes and the reference ran in this one:
  # determinism holds across processes, to the bit, curves included.
  _assert_bitwise_equal(model_dir, reference_run)
  _assert_each_step_once(model_dir)
  for run in ("train", "test"):
    assert (read_scalars(os.path.join(model_dir, run))["loss"] ==
            read_scalars(os.path.join(reference_run, run))["loss"])


# A ResNet with dropout: batch norm's moving statistics and dropout's random
# state must come back from the checkpoint too (the masks go on, not over).
RESNET = ["--dataset=synthetic", "--synthetic_train_size=256",
          "--synthetic_test_size=32", "--batch_size=32", "--epochs=2",
          "--steps_per_loop=4", "--checkpoint_every_steps=8",
          "--model=resnet", "--resnet_depth=8", "--dropout=0.3",
          "--deterministic", "--eval_images=0", "--noexport", "--seed=5"]


@pytest.mark.slow
def test_a_resnet_with_dropout_killed_mid_epoch_resumes_bitwise(tmp_path):
  reference = str(tmp_path / "reference")
  assert run_in_process("train_loop.py", *RESNET,
                        f"--model_dir={reference}").returncode == 0
  model_dir = str(tmp_path / "killed")
  args = [*RESNET, f"--model_dir={model_dir}"]
  killed = signal_script_at("train step 12/16", args, signal.SIGKILL)
  assert killed.returncode == -signal.SIGKILL, killed.stdout
  assert tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints")).endswith("ckpt-8")
  proc = run_in_process("train_loop.py", *args)
  assert proc.returncode == 0, proc.stderr
  assert "at step 8/16" in proc.stdout
  _, a = _checkpoint_values(model_dir)
  _, b = _checkpoint_values(reference)
  assert a.keys() == b.keys()
  assert "rng/dropout0/.ATTRIBUTES/VARIABLE_VALUE" in a
  assert any("stage3_block1/second/bn/moving_variance" in k for k in a)
  assert a["rng/dropout0/.ATTRIBUTES/VARIABLE_VALUE"][1] == 16  # A draw a step.
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, reference_run):
  # A copy of the finished reference run, its last checkpoint then damaged.
  model_dir = str(tmp_path / "damaged")
  shutil.copytree(reference_run, model_dir)
  args = [*SMOKE, "--synthetic_test_size=2048", f"--model_dir={model_dir}"]
  data_file = os.path.join(model_dir, "checkpoints",
                           "ckpt-48.data-00000-of-00001")
  with open(data_file, "r+b") as f:
    f.truncate(os.path.getsize(data_file) // 2)
  proc = run_in_process("train_loop.py", *args)
  assert proc.returncode == 0, proc.stderr
  assert (f"checkpoint data file {data_file} is damaged" in proc.stderr
          and "falling back to the previous checkpoint" in proc.stderr), (
              proc.stderr)
  assert "resumed from" in proc.stdout and "at step 32/48" in proc.stdout
  _assert_bitwise_equal(model_dir, reference_run)
  _assert_each_step_once(model_dir)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  model_dir = str(tmp_path / "nan")
  args = [*SMOKE, f"--model_dir={model_dir}"]
  assert run_in_process("train_loop.py", *args, "--epochs=1").returncode == 0
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  before = {f: _digest(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)}
  # The resumed run's first update with this rate overflows the weights, so
  # the next step's loss is not finite: exit status 3.
  proc = run_in_process("train_loop.py", *args, "--learning_rate=1e30")
  assert proc.returncode == 3
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: loss or gradient is not finite at step 18")
  assert "ckpt-16" in last
  after = {f: _digest(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)}
  assert after == before
  net_path, values = _checkpoint_values(model_dir)
  assert net_path.endswith("ckpt-16")
  assert all(np.all(np.isfinite(v)) for v in values.values()
             if v.dtype.kind == "f")


@pytest.mark.slow  # Three runs.
def test_nan_policy_skip_counts_and_goes_on(tmp_path):
  model_dir = str(tmp_path / "skip")
  args = [*SMOKE, f"--model_dir={model_dir}", "--nan_policy=skip"]
  assert run_in_process("train_loop.py", *args, "--epochs=1").returncode == 0
  assert run_in_process("train_loop.py", *args,
                        "--learning_rate=1e30").returncode == 0
  with open(os.path.join(model_dir, "metrics.json")) as f:
    metrics = json.load(f)
  # Step 17 applies the exploding update; every later step is skipped.
  assert metrics["global_step"] == 48
  assert metrics["skipped_steps"] == 31
  assert metrics["optimizer_steps"] == 17
  skipped = read_scalars(os.path.join(model_dir, "train"))["skipped_steps"]
  assert skipped[-1] == (48, 31.0)


def _digest(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _snapshot(root):
  return {os.path.relpath(os.path.join(d, f), root):
          _digest(os.path.join(d, f))
          for d, _, files in os.walk(root) for f in files}


# Bad inputs ----------------------------------------------------------------


def _folder(tmp_path, mutate=None):
  root = write_image_folder(str(tmp_path / "images"))
  if mutate:
    mutate(tmp_path / "images")
  return ["--dataset=folder", f"--data_dir={root}"]


def _cifar(tmp_path, mutate=None):
  write_cifar_batches(str(tmp_path / "cifar"))
  if mutate:
    mutate(tmp_path / "cifar" / "cifar-10-batches-py")
  return ["--dataset=cifar10", f"--data_dir={tmp_path / 'cifar'}"]


class _Exploit:
  def __reduce__(self):
    return (os.system, ("touch /tmp/should_never_exist",))


def _write_pickle(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def _other_model_checkpoint(tmp_path, model_dir):
  # A 3-class model trained into model_dir; the case then trains 10 classes.
  assert run_in_process("train_loop.py", "--epochs=1", "--batch_size=4",
                        *_folder(tmp_path),
                        f"--model_dir={model_dir}").returncode == 0
  # A run directory from before config.json: the checkpoint itself tells
  # (with config.json, tests/test_resume.py's guard refuses it first).
  os.remove(os.path.join(model_dir, "config.json"))
  os.remove(os.path.join(model_dir, "data.json"))
  return ["--dataset=synthetic", "--synthetic_train_size=64",
          "--synthetic_test_size=16"]


def _zip(tmp_path):
  path = tmp_path / "data.zip"
  import zipfile
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("train/a/1.txt", "x")
  return ["--dataset=folder", f"--data_dir={path}"]


def _flagfile(tmp_path, text):
  path = tmp_path / "bad.flags"
  path.write_text(text)
  return [f"--flagfile={path}"]


BAD_INPUTS = {
    "corrupt_image": (lambda t, m: _folder(t, lambda r: (
        r / "train" / "dog" / "0.jpg").write_bytes(b"\xff\xd8garbage")),
        "0.jpg"),
    "text_file_named_png": (lambda t, m: _folder(t, lambda r: (
        r / "test" / "cat" / "notes.png").write_text("hello")), "notes.png"),
    "empty_class_folder": (lambda t, m: _folder(t, lambda r: os.makedirs(
        r / "train" / "empty")), "holds no"),
    "mixed_image_sizes": (lambda t, m: _folder(t, lambda r: tf.io.write_file(
        str(r / "train" / "cat" / "big.png"),
        tf.io.encode_png(tf.zeros((40, 40, 3), tf.uint8)))), "big.png is 40x40"),
    "missing_test_split": (lambda t, m: _folder(t, lambda r: os.rename(
        r / "test", r / "tests")), "no test/ subfolder"),
    "data_dir_is_a_zip": (lambda t, m: _zip(t), "is a zip file"),
    "bad_resize_value": (lambda t, m: _folder(t) + ["--resize_images=big"],
                         "is not HEIGHTxWIDTH"),
    "cifar_label_out_of_range": (lambda t, m: _cifar(t, lambda r: _write_pickle(
        r / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8),
                             b"labels": [3, 11]})), "label 11"),
    "cifar_truncated_batch": (lambda t, m: _cifar(t, lambda r: open(
        r / "data_batch_4", "r+b").truncate(100)), "data_batch_4"),
    "cifar_malicious_pickle": (lambda t, m: _cifar(t, lambda r: _write_pickle(
        r / "test_batch", {b"data": _Exploit()})), "refusing to load"),
    "cifar_missing_batches": (lambda t, m: _cifar(t, lambda r: os.remove(
        r / "data_batch_1")), "no CIFAR-10 python batches"),
    "data_dir_is_a_file": (lambda t, m: ["--dataset=cifar10",
                                         f"--data_dir={REPO}/README.md"],
                           "is a file"),
    "flagfile_missing": (lambda t, m: ["--flagfile=/no/such.flags"],
                         "such.flags"),
    "flagfile_unknown_flag": (lambda t, m: _flagfile(t, "--epochs=1\n--lr=3\n"),
                              "lr"),
    "model_dir_of_another_model": (_other_model_checkpoint,
                                   "checkpoint of a different model"),
    "batch_larger_than_data": (lambda t, m: [
        "--dataset=synthetic", "--synthetic_train_size=20",
        "--batch_size=32"], "exceeds the 20 training examples"),
    "deterministic_with_xla": (lambda t, m: [
        "--dataset=synthetic", "--deterministic", "--jit_compile=true"],
        "--deterministic cannot be combined with XLA"),
    "non_positive_epochs": (lambda t, m: ["--epochs=0"],
                            "--epochs must be a positive"),
}


def _check_bad_input(tmp_path, case, run):
  make_args, message = BAD_INPUTS[case]
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "notes.txt").write_text("written before")
  args = make_args(tmp_path, str(model_dir))
  before = _snapshot(str(model_dir))
  proc = run("train_loop.py", *args, f"--model_dir={model_dir}")
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
  assert message in errors[0], errors[0]
  assert _snapshot(str(model_dir)) == before
  assert not os.path.exists("/tmp/should_never_exist")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_line_and_changes_nothing(tmp_path, case):
  _check_bad_input(tmp_path, case, run_in_process)


@pytest.mark.parametrize("strategy", ["auto", "multi_worker_mirrored"])
def test_a_tf_config_that_is_not_json_gets_one_clear_line(tmp_path, strategy,
                                                          monkeypatch):
  monkeypatch.setenv("TF_CONFIG", "{'cluster': {}}")
  proc = run_in_process("train_loop.py", "--flagfile=configs/smoke.flags",
                        f"--strategy={strategy}",
                        f"--model_dir={tmp_path / 'run'}")
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: TF_CONFIG is not a JSON object (Expecting property name "
      "enclosed in double quotes"), proc.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_model_dir_whose_name_is_not_utf8_is_refused_untouched(tmp_path):
  model_dir = os.path.join(str(tmp_path), os.fsdecode(b"run\xff"))
  proc = run_in_process("train_loop.py", "--flagfile=configs/smoke.flags",
                        f"--model_dir={model_dir}")
  assert proc.returncode == 2, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (f"error: --model_dir {tmp_path}/run\\xff has a name that "
                  f"is not valid UTF-8 (shown as \\xNN), which TensorFlow "
                  f"cannot open; rename it")
  assert os.listdir(tmp_path) == []


def test_a_failed_save_keeps_earlier_checkpoints(tmp_path):
  from research.checkpoints import CheckpointKeeper
  from research.errors import UserError
  v = tf.Variable(1.0)
  keeper = CheckpointKeeper(checkpoint=tf.train.Checkpoint(v=v),
                            directory=str(tmp_path / "ckpts"), max_to_keep=2)
  keeper.save(1)
  before = _snapshot(str(tmp_path / "ckpts"))

  # Block the save's temporary output (TensorFlow writes <prefix>_temp/
  # first), as a full or failing disk would.
  (tmp_path / "ckpts" / "ckpt-2_temp").write_text("in the way")
  before = _snapshot(str(tmp_path / "ckpts"))
  with pytest.raises(UserError, match="earlier checkpoints are intact"):
    keeper.save(2)
  assert _snapshot(str(tmp_path / "ckpts")) == before
  v.assign(5.0)
  assert keeper.restore_latest().endswith("ckpt-1")
  assert float(v) == 1.0


def test_full_or_read_only_model_dir_is_refused_before_training(tmp_path,
                                                                 monkeypatch):
  sys.path.insert(0, SCRIPTS)
  import cli_common
  from absl import flags as absl_flags
  from research.errors import UserError
  fv = absl_flags.FlagValues()
  absl_flags.DEFINE_string("model_dir", str(tmp_path / "run"), "",
                           flag_values=fv)
  absl_flags.DEFINE_string("run_name", None, "", flag_values=fv)
  absl_flags.DEFINE_string("dataset", "synthetic", "", flag_values=fv)
  fv(["prog"])
  assert cli_common.resolve_model_dir(fv) == str(tmp_path / "run")

  full = cli_common.shutil.disk_usage(str(tmp_path))._replace(free=2**20)
  monkeypatch.setattr(cli_common.shutil, "disk_usage", lambda path: full)
  with pytest.raises(UserError, match=r"only 1 MB free .* at least 20 MB"):
    cli_common.resolve_model_dir(fv)
  monkeypatch.undo()

  def read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system")
  monkeypatch.setattr(cli_common.tempfile, "TemporaryFile", read_only)
  with pytest.raises(UserError, match="Read-only file system"):
    cli_common.resolve_model_dir(fv)
