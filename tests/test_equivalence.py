"""The loop equals model.fit on one device, and the check can fail.

Everything runs in one fresh process (tests/equivalence_batch.py), which
spares a TensorFlow start per case: scripts/verify_equivalence.py itself
twice (a PASS and a FAIL: exit statuses and output, through its
``run(flags, argv)``), and the other one-device comparisons through the
same ``research.equivalence.run``. Several replicas:
test_equivalence_replicas.py.
"""

import pytest

from conftest import (assert_bitwise_equal_to_fit, assert_equivalent,
                      assert_loss_fell, run_equivalence_batch)

# Fresh processes: the verifier and a batch of cases.
pytestmark = pytest.mark.slow

# 800 examples / batch 32 = 25 steps (one epoch, the default length).
SMALL = ["--synthetic_train_size=800", "--synthetic_test_size=128"]
DATA = {"num_train": 800, "num_test": 128}
STEPS = 25
# 320 examples: 10 steps, for the cases that only compare numbers (XLA and
# mixed precision, whose float16/bfloat16 kernels are slow with oneDNN off).
DATA_10 = {"num_train": 320, "num_test": 128}

# 320 tiny images: 10 steps of ResNet-8; 328: and a short batch of 8.
DATA_RESNET = {"num_train": 320, "num_test": 64, "image_shape": [8, 8, 3]}
DATA_RESNET_SHORT = {**DATA_RESNET, "num_train": 328}
RESNET = {"name": "resnet", "resnet_depth": 8}

CASES = {
    # What a single GPU runs by default: float16 with XLA, which also stands
    # for float32 with XLA (the same compiled step but for the dtype; float32
    # XLA trains in test_gpu_readiness.py). float16 without XLA, its
    # LossScaleOptimizer the same: on 2 replicas in
    # test_equivalence_replicas.py.
    "mixed_float16_xla": (DATA_10, {"dtype": "mixed_float16",
                                    "jit_compile": True}),
    # Batch norm (moving statistics) and dropout (random masks): ResNet-8
    # on 8x8 images. The ResNet registers no Sequential twin: fit trains a
    # second instance (as for any such model). Without dropout, with what
    # else a case can carry (one Keras fit and one loop to trace a case):
    # L2 regularization, a kept short batch, SGD with Nesterov momentum and
    # a cosine schedule with warmup.
    "resnet": (DATA_RESNET_SHORT, {
        "model": {**RESNET, "l2": 0.001}, "keep_short_batch": True,
        "optimizer": {"name": "sgd", "learning_rate": 0.05, "nesterov": True,
                      "lr_schedule": "cosine", "warmup_steps": 3}}),
    # Dropout, in bfloat16, batch norm on the fused kernel (the case above
    # on Keras' own).
    "resnet_dropout_bf16": (DATA_RESNET, {
        "model": {**RESNET, "dropout": 0.3, "fused_batch_norm": True},
        "dtype": "mixed_bfloat16"}),
}
# The verifier's own command lines.
SCRIPT_RUNS = {
    "script_pass": {"script": [*SMALL, "--replicas=1"]},
    "script_fail": {"script": [*SMALL, "--replicas=2", "--steps=4",
                               "--inject_fault=unscaled_loss",
                               "--fault_step=2"]},
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  return run_equivalence_batch(tmp_path_factory.mktemp("one_device"),
                               {**SCRIPT_RUNS, **CASES})


def test_one_device_is_bitwise_identical_to_fit(reports):
  proc, report = reports["script_pass"], reports["script_pass"]["report"]
  assert proc["returncode"] == 0, proc["stdout"]
  assert proc["stdout"].strip().endswith("PASS")
  assert report["mode"] == "one_device" and report["steps"] == STEPS
  assert report["dtype"] == "float32"
  assert len(report["fit_losses"]) == len(report["loop_losses"]) == STEPS
  assert report["max_loss_diff"] == 0.0
  assert report["max_weight_diff"] == 0.0
  # fit's per-batch loss, recovered from its running mean, is exact.
  assert report["fit_loss_recovery_error"] == 0.0
  assert report["loop_eval"]["correct"] == report["fit_eval"]["correct"]
  assert abs(report["loop_eval"]["loss"] - report["fit_eval"]["loss"]) <= 1e-6
  assert_loss_fell(report["loop_losses"])  # Training happened.


def test_the_script_fails_a_wrong_loop_at_the_right_step(reports):
  proc, report = reports["script_fail"], reports["script_fail"]["report"]
  assert proc["returncode"] == 1
  assert proc["stdout"].strip().endswith("FAIL")
  assert not report["passed"]
  assert report["first_failing_step"] == 2
  assert "FAIL: step 2: |loss difference|" in proc["stdout"]


def test_float16_with_xla_matches_fit(reports):
  # bfloat16 (without XLA): the ResNet's case below.
  report = reports["mixed_float16_xla"]
  assert report["mode"] == "one_device"
  assert report["max_weight_diff"] == 0.0
  assert_equivalent(report)


def test_a_resnet_with_regularization_and_a_short_batch_matches_fit(reports):
  """Every weight and moving statistic bitwise; the reported loss with L2
  within one float32 ulp (README, equivalence footnote 1)."""
  report = reports["resnet"]
  assert report["mode"] == "one_device" and report["steps"] == 11
  assert report["compared"] == {"trainable": 23, "non_trainable": 14,
                                "random_states": 0}
  assert report["fit_loss_recovery_error"] <= 1e-6
  assert report["max_weight_diff"] == 0.0
  assert_equivalent(report)
  assert_loss_fell(report["loop_losses"])


def test_a_resnet_with_dropout_in_bfloat16_is_bitwise_fit(reports):
  """Every loss, weight, moving statistic and dropout random state, with
  batch norm on the fused kernel."""
  report = reports["resnet_dropout_bf16"]
  assert report["mode"] == "one_device" and report["steps"] == 10
  assert report["compared"] == {"trainable": 23, "non_trainable": 14,
                                "random_states": 1}
  assert report["fit_loss_recovery_error"] == 0.0
  assert_bitwise_equal_to_fit(report)
  assert_loss_fell(report["loop_losses"])
