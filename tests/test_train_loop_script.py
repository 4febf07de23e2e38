"""End-to-end tests of scripts/train_loop.py: one real process per kind of
ending (success, a bad flag, a bad value found after TensorFlow loaded), the
rest through the same ``run`` in this process (conftest.run_in_process)."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import cli_common
import train_loop
from conftest import REPO, read_scalars, run_in_process, run_script
from research import config as config_lib
from research import data as data_lib
from research import model as model_lib

SMOKE = "--flagfile=configs/smoke.flags"
# configs/smoke.flags: 512 training examples (64 of 576 held out for
# validation), batch 32 -> 16 steps/epoch, 3 epochs, 8 steps per loop,
# checkpoints every 16 steps; validation each epoch, the test set at the end.
TRAIN_STEPS = [8, 16, 24, 32, 40, 48]
EVAL_STEPS = [16, 32, 48]
# metrics.json's summary of the test set, and its name (None when nothing
# was evaluated).
HEADLINE_KEYS = {"eval_accuracy", "eval_loss", "eval_nll", "eval_brier",
                 "eval_ece", "eval_correct", "eval_count",
                 "eval_class_accuracy", "eval_set"}


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("smoke"))
  proc = run_script("train_loop.py", SMOKE, f"--model_dir={model_dir}",
                    check=True)
  return model_dir, proc


@pytest.mark.slow
def test_smoke_run_writes_events_checkpoint_and_metrics(smoke_run):
  model_dir, proc = smoke_run
  train = read_scalars(os.path.join(model_dir, "train"))
  per_loop = {"loss", "accuracy", "weight_norm", "steps_per_second",
              "examples_per_second"}
  per_step = {"learning_rate", "grad_norm"}
  assert set(train) == per_loop | per_step
  for tag in per_loop:
    assert [s for s, _ in train[tag]] == TRAIN_STEPS, tag
  for tag in per_step:
    assert [s for s, _ in train[tag]] == list(range(1, 49)), tag
  assert all(v == pytest.approx(0.001) for _, v in train["learning_rate"])
  assert train["loss"][-1][1] < train["loss"][0][1]
  validation = read_scalars(os.path.join(model_dir, "validation"))
  evals = read_scalars(os.path.join(model_dir, "test"))
  per_evaluation = {"loss", "accuracy", "nll", "brier", "ece"}
  for scalars in (validation, evals):
    assert per_evaluation <= set(scalars)
    assert all(t in per_evaluation or t.startswith("class_accuracy/")
               for t in scalars)
  assert [s for s, _ in validation["accuracy"]] == EVAL_STEPS
  assert [s for s, _ in evals["accuracy"]] == [48]  # Once, at the end.

  assert tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints")).endswith("ckpt-48")
  metrics = _metrics(model_dir)
  assert metrics["global_step"] == 48 and metrics["epochs"] == 3
  assert {k for k in metrics if k.startswith("eval_")} == HEADLINE_KEYS
  assert metrics["eval_count"] == 128
  assert metrics["evaluations"]["validation"]["count"] == 64
  assert metrics["eval_accuracy"] == metrics["eval_correct"] / 128
  assert metrics["eval_accuracy"] == pytest.approx(evals["accuracy"][-1][1])
  for name in ("nll", "brier", "ece"):
    assert metrics[f"eval_{name}"] == pytest.approx(evals[name][-1][1])
  # No regularization: the loss is the negative log-likelihood.
  assert metrics["eval_nll"] == pytest.approx(metrics["eval_loss"])
  assert metrics["wall_seconds"] > 0
  assert metrics["train_examples_per_second"] > 0
  with open(os.path.join(model_dir, "flags.json")) as f:
    flag_values = json.load(f)
  assert flag_values["batch_size"] == 32
  assert flag_values["dataset"] == "synthetic"
  assert "train step 48/48" in proc.stdout and "eval test step 48/48" in proc.stdout
  assert "eval validation step 16/48" in proc.stdout
  assert "eval test step 16/48" not in proc.stdout
  assert "ETA" in proc.stdout


@pytest.mark.parametrize("flagfile", sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs",
                                                        "*.flags"))))
def test_every_config_is_a_valid_run_and_holds_out_validation(flagfile):
  fv = flags.FlagValues()
  train_loop.define_flags(fv)
  fv(["train_loop.py", f"--flagfile={os.path.join(REPO, 'configs', flagfile)}"])
  config = cli_common.train_config_from_flags(
      fv, model_dir="unused", strategy=tf.distribute.get_strategy())
  if flagfile == "cifar10.flags":  # The seed's fit(validation_data=test).
    assert config.data.validation_size == 0
    assert config.loop.eval_sets == config.loop.final_eval_sets == ("test",)
  else:  # Selection never sees the test set: it is evaluated at the end.
    assert config.data.validation_size > 0
    assert "test" not in config.loop.eval_sets
    assert "test" in config.loop.final_eval_sets
  if flagfile == "cifar10_fast.flags":
    assert config.loop.eval_sets == ()  # Time: the final evaluation only.
    assert config.model.flip_average
    assert config.step.mixed_precision == "mixed_bfloat16"
  if flagfile == "cifar10_resnet20.flags":  # Views chosen on validation.
    assert config.model.flip_average and config.model.shift_average == 1
    assert config.model.fused_batch_norm


def test_every_flag_default_is_the_config_default():
  """A run from flags and the library called without them start alike."""
  fv = flags.FlagValues()
  train_loop.define_flags(fv)
  # Resolved by cli_common.train_config_from_flags: the batch from
  # --batch_size or --per_replica_batch_size, XLA's "auto" by device, the
  # evaluation sets by --validation_size, the run folder by --run_name.
  resolved = {"global_batch_size", "jit_compile", "eval_sets",
              "final_eval_sets", "model_dir"}
  compared = 0
  for name, value in config_lib.to_flat(
      config_lib.TrainConfig(model_dir="")).items():
    if name in resolved:
      continue
    default = fv[name].default
    assert (tuple(default) if isinstance(default, list) else default
            ) == value, name
    compared += 1
  assert compared == 46


def test_flags_after_the_flagfile_override_it(tmp_path):
  model_dir = str(tmp_path / "run")
  # Empty evaluation sets: nothing evaluated, during or at the end.
  proc = run_in_process("train_loop.py", SMOKE, "--epochs=1",
                        "--steps_per_loop=16", "--eval_sets=",
                        "--final_eval_sets=", f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  metrics = _metrics(model_dir)
  assert metrics["global_step"] == 16 and metrics["epochs"] == 1
  assert metrics["evaluations"] == {}
  assert {k: v for k, v in metrics.items() if k.startswith("eval_")} == (
      dict.fromkeys(HEADLINE_KEYS))  # The same keys, without values.
  assert "eval " not in proc.stdout
  assert proc.stdout.strip().splitlines()[-1].startswith(
      "done: step 16 in ") and "nothing evaluated" in proc.stdout


@pytest.mark.slow
def test_resume_trains_only_what_is_left(tmp_path, smoke_run):
  model_dir = str(tmp_path / "resumed")
  # A run that stops after its first epoch (16 steps) ...
  run_in_process("train_loop.py", SMOKE, "--epochs=1",
                 f"--model_dir={model_dir}")
  assert _metrics(model_dir)["global_step"] == 16
  # ... then the same run with its full length resumes and finishes.
  proc = run_in_process("train_loop.py", SMOKE, f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  assert "at step 16/48" in proc.stdout
  assert "train step 8/48" not in proc.stdout
  assert _metrics(model_dir)["global_step"] == _metrics(smoke_run[0])[
      "global_step"] == 48
  train = read_scalars(os.path.join(model_dir, "train"))
  assert [s for s, _ in train["loss"]] == TRAIN_STEPS  # each step once
  # Running a finished run again changes nothing and records nothing twice.
  assert run_in_process("train_loop.py", SMOKE,
                        f"--model_dir={model_dir}").returncode == 0
  evals = read_scalars(os.path.join(model_dir, "validation"))
  assert [s for s, _ in evals["accuracy"]] == EVAL_STEPS


def test_two_cpu_replicas_report_correct_eval_accuracy(tmp_path):
  model_dir = str(tmp_path / "mirrored")
  proc = run_in_process("train_loop.py", SMOKE, "--cpu_replicas=2",
                        "--epochs=1", f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr
  assert "MirroredStrategy x2" in proc.stdout
  metrics = _metrics(model_dir)
  assert metrics["num_replicas"] == 2 and metrics["global_step"] == 16
  # Recompute the accuracy of the saved weights independently.
  data = data_lib.make_synthetic(num_train=576, num_test=128, seed=1)
  net = model_lib.build(model_lib.ConvNet())
  tf.train.Checkpoint(model=net).restore(tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints"))).expect_partial()
  predicted = np.argmax(net(data.test_images / np.float32(255)).numpy(), -1)
  correct = int(np.sum(predicted == data.test_labels))
  assert metrics["eval_correct"] == correct
  assert metrics["eval_accuracy"] == correct / 128


def _bad_dir_under_a_file(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  return str(blocker / "run")


BAD_FLAGS = [
    ("batch_not_divisible", ["--cpu_replicas=2", "--batch_size=33"],
     "does not divide over the 2 replicas"),
    ("resnet_depth_not_6n_plus_2", ["--model=resnet", "--resnet_depth=22"],
     "--resnet_depth must be 6n+2"),
    ("zero_epochs", ["--epochs=0"], "--epochs must be a positive"),
    ("negative_epochs", ["--epochs=-3"], "--epochs must be a positive"),
    ("zero_learning_rate", ["--learning_rate=0"],
     "flag --learning_rate=0.0: learning_rate must be > 0, got 0.0"),
    ("momentum_of_one", ["--optimizer=sgd", "--momentum=1"],
     "flag --momentum=1.0: momentum must be in [0, 1), got 1.0"),
    ("label_smoothing_of_one", ["--label_smoothing=1"],
     "flag --label_smoothing=1.0: label_smoothing must be in [0, 1)"),
    ("unknown_dataset", ["--dataset=imagenet"], "dataset"),
    ("unknown_strategy", ["--strategy=parameter_server"], "strategy"),
    ("missing_data_dir", ["--dataset=cifar10", "--data_dir=/no/such/dir"],
     "/no/such/dir does not exist"),
    ("folder_without_data_dir", ["--dataset=folder"], "needs --data_dir"),
    ("unwritable_model_dir", None, "is not a writable folder"),
    ("unknown_flag", ["--epochz=3"], "epochz"),
    ("missing_flagfile", ["--flagfile=configs/nope.flags"], "nope.flags"),
    ("unknown_optimizer", ["--optimizer=lamb"], "optimizer"),
    ("warmup_longer_than_run", ["--warmup_steps=48"],
     "--warmup_steps=48 must be less than the run's 48 steps"),
    ("cutout_without_augment", ["--cutout=8"],
     "cutout is part of the training augmentation: it needs augment "
     "(--augment)"),
    ("negative_cutout", ["--augment", "--cutout=-1"],
     "cutout must be >= 0, got -1"),
    ("zero_decay_rate", ["--lr_decay_rate=0"],
     "flag --lr_decay_rate=0.0: lr_decay_rate must be in (0, 1]"),
    ("bad_profile_steps", ["--profile_steps=9"],
     "--profile_steps=9 is not FIRST,LAST"),
    ("reversed_profile_steps", ["--profile_steps=9,3"],
     "--profile_steps=9,3 is not FIRST,LAST"),
    ("validation_not_smaller_than_train", ["--validation_size=576"],
     "--validation_size=576 must be in [0, 576)"),
    ("validation_empties_a_class", ["--validation_size=575"],
     "--validation_size=575 leaves no training example of class"),
    ("validation_set_without_a_split",
     ["--validation_size=0", "--eval_sets=validation"],
     "validation_size is 0"),
    ("unknown_eval_set", ["--final_eval_sets=train"],
     "final_eval_sets must be distinct set names (validation, test, or one "
     "the dataset adds), got ('train',)"),
    ("best_metric_never_reported",
     ["--eval_sets=test", "--best_metric=validation/accuracy"],
     "best_metric 'validation/accuracy' needs the set 'validation' "
     "evaluated during training"),
    ("unknown_best_metric", ["--best_metric=test/f1"],
     "best_metric must be SET/METRIC with METRIC one of"),
    ("patience_without_a_metric", ["--early_stopping_patience=3"],
     "early_stopping_patience needs a best_metric"),
]


def _assert_one_error_line(proc, message):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
  assert message in errors[0]
  assert "train step" not in proc.stdout


def _bad_flag_args(tmp_path, args):
  if args is None:
    return [f"--model_dir={_bad_dir_under_a_file(tmp_path)}"]
  return args + [f"--model_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("name,args,message", BAD_FLAGS,
                         ids=[b[0] for b in BAD_FLAGS])
def test_bad_flags_give_one_clear_line(tmp_path, name, args, message):
  proc = run_in_process("train_loop.py", SMOKE,
                        *_bad_flag_args(tmp_path, args))
  _assert_one_error_line(proc, message)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unknown_flag", "batch_not_divisible"])
def test_a_real_process_exits_2_with_one_line(tmp_path, name):
  """Before TensorFlow loads (a flag absl refuses) and after (a value only
  the strategy can check): exit status 2, one line, no traceback."""
  _, args, message = next(b for b in BAD_FLAGS if b[0] == name)
  proc = run_script("train_loop.py", SMOKE, *_bad_flag_args(tmp_path, args),
                    timeout=120)
  _assert_one_error_line(proc, message)
