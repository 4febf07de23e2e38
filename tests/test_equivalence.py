"""scripts/verify_equivalence.py: the loop equals model.fit, and the check
can fail."""

import json

import pytest

from conftest import run_script

# 1600 examples / batch 32 = 50 steps (one epoch, the default length).
SMALL = ["--synthetic_train_size=1600", "--synthetic_test_size=256"]


def _verify(tmp_path, *args):
  out = tmp_path / "report.json"
  proc = run_script("verify_equivalence.py", *SMALL, *args,
                    f"--json_out={out}", timeout=300)
  with open(out) as f:
    return proc, json.load(f)


def test_one_device_is_bitwise_identical_to_fit(tmp_path):
  proc, report = _verify(tmp_path, "--replicas=1")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.strip().endswith("PASS")
  assert report["mode"] == "one_device" and report["steps"] == 50
  assert report["dtype"] == "float32"
  assert len(report["fit_losses"]) == len(report["loop_losses"]) == 50
  assert report["max_loss_diff"] == 0.0
  assert report["max_weight_diff"] == 0.0
  # fit's per-batch loss, recovered from its running mean, is exact.
  assert report["fit_loss_recovery_error"] == 0.0
  assert report["loop_eval"]["correct"] == report["fit_eval"]["correct"]
  assert abs(report["loop_eval"]["loss"] - report["fit_eval"]["loss"]) <= 1e-6
  # Training happened: the loss fell.
  assert report["loop_losses"][-1] < report["loop_losses"][0] - 0.5


def test_two_replicas_match_one_device_fit(tmp_path):
  proc, report = _verify(tmp_path, "--replicas=2")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert report["mode"] == "loop_replicas_vs_fit_one_device"
  assert report["dtype"] == "float64"
  assert report["max_loss_diff"] <= 1e-5
  assert report["max_weight_diff"] <= 1e-4
  assert report["loop_eval"]["correct"] == report["fit_eval"]["correct"]


def test_loop_and_fit_under_the_same_two_replica_strategy(tmp_path):
  proc, report = _verify(tmp_path, "--fit_replicas=2", "--steps_per_loop=7")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert report["mode"] == "same_strategy" and report["dtype"] == "float32"
  assert report["config"]["replicas"] == 2
  assert report["max_loss_diff"] <= 1e-6
  assert report["max_weight_diff"] <= 1e-6


@pytest.mark.parametrize("args", [
    ["--replicas=1", "--l2=0.001"],
    ["--replicas=2", "--l2=0.001"],
    # 1608 examples: 50 full batches and a short one of 8.
    ["--replicas=1", "--keep_short_batch", "--synthetic_train_size=1608"],
    ["--replicas=2", "--keep_short_batch", "--synthetic_train_size=1608"],
], ids=["l2_one_device", "l2_two_replicas", "short_batch_one_device",
        "short_batch_two_replicas"])
def test_regularization_and_short_batch_match_fit(tmp_path, args):
  proc, report = _verify(tmp_path, *args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  tolerance = report["tolerance"]
  assert report["max_loss_diff"] <= tolerance["loss"]
  assert report["max_weight_diff"] <= tolerance["weight"]
  if "--keep_short_batch" in args:
    assert report["steps"] == 51


@pytest.mark.parametrize("fault,extra,step", [
    ("unscaled_loss", [], 0),
    ("unscaled_regularization", ["--l2=0.001"], 12),
])
def test_a_wrong_loop_is_caught_at_the_right_step(tmp_path, fault, extra,
                                                  step):
  proc, report = _verify(tmp_path, "--replicas=2", f"--inject_fault={fault}",
                         f"--fault_step={step}", *extra)
  assert proc.returncode == 1
  assert proc.stdout.strip().endswith("FAIL")
  assert not report["passed"]
  assert report["first_failing_step"] == step
  assert f"FAIL: step {step}: |loss difference|" in proc.stdout
  # Steps before the fault still agree.
  assert all(abs(a - b) <= 1e-5 for a, b in zip(
      report["fit_losses"][:step], report["loop_losses"][:step]))


@pytest.mark.parametrize("args", [
    ["--replicas=1", "--jit_compile"],
    ["--replicas=1", "--dtype=mixed_bfloat16"],
    ["--replicas=1", "--dtype=mixed_float16"],
], ids=["xla_one_device", "mixed_bfloat16", "mixed_float16"])
def test_xla_and_mixed_precision_match_fit(tmp_path, args):
  proc, report = _verify(tmp_path, *args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert report["mode"] == "one_device"
  assert report["max_weight_diff"] == 0.0
  assert report["loop_eval"]["correct"] == report["fit_eval"]["correct"]


@pytest.mark.parametrize("args", [
    ["--replicas=1", "--optimizer=sgd", "--learning_rate=0.05",
     "--lr_schedule=cosine", "--warmup_steps=5"],
    ["--fit_replicas=2", "--optimizer=adamw", "--weight_decay=0.01",
     "--lr_schedule=step", "--warmup_steps=3"],
], ids=["sgd_cosine_one_device", "adamw_step_two_replicas"])
def test_other_optimizers_and_schedules_match_fit_bitwise(tmp_path, args):
  """The loop applies pre-summed gradients in its own way (explicit
  all-reduce); Keras' other optimizers and a schedule still give fit's
  weights to the bit, on one device and under the same 2-replica strategy."""
  proc, report = _verify(tmp_path, *args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert report["max_loss_diff"] == 0.0
  assert report["max_weight_diff"] == 0.0
  assert report["loop_eval"]["correct"] == report["fit_eval"]["correct"]
  assert report["loop_losses"][-1] < report["loop_losses"][0] - 0.2
