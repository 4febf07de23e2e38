"""The loop equals model.fit across replicas: 2 replicas against one-device
fit (in float64), and loop and fit under the same 2-replica strategy.

Every case runs through ``research.equivalence.run`` in one fresh process
(tests/equivalence_batch.py), each under strategies of its own; the
ResNet's cases, after the ConvNet's, also show that collectives of different
shapes in one process do not collide (``distribute.mirrored_strategy``).
"""

import pytest

from conftest import (assert_bitwise_equal_to_fit, assert_equivalent,
                      assert_loss_fell, run_equivalence_batch)
from test_equivalence import DATA, DATA_10, DATA_RESNET, DATA_RESNET_SHORT, RESNET

# A fresh process for the batch of cases.
pytestmark = pytest.mark.slow

SGD = {"name": "sgd", "learning_rate": 0.05}

CASES = {
    # Under the same strategy (float32): the penalty is then the only
    # difference the fault makes.
    "unscaled_regularization": (DATA, {
        "replicas": 2, "fit_replicas": 2, "model": {"l2": 0.001},
        "fault": "unscaled_regularization", "fault_step": 12}),
    # What several GPUs run: float16 (a LossScaleOptimizer) on 2 replicas.
    "mixed_float16": (DATA_10, {"replicas": 2, "fit_replicas": 2,
                                "dtype": "mixed_float16"}),
    # ResNet-8 (batch norm, no Sequential twin): under one 2-replica
    # strategy with dropout (each replica its own masks, on both sides),
    # AdamW and a step schedule with warmup, 7 steps a call; against
    # one-device fit (float64) with batch norm synchronized (the default
    # with replicas) on 2 replicas, with L2 and a kept short batch (8
    # examples), and on 4; and per replica (which must fail). Those three
    # are about batch norm: plain SGD, whose update traces in a fraction of
    # Adam's time on each replica (the 4-replica case alone: 19 s against
    # 26, one run each).
    "resnet_same_strategy_dropout": (DATA_RESNET, {
        "replicas": 2, "fit_replicas": 2, "steps_per_loop": 7,
        "model": {**RESNET, "dropout": 0.3},
        "optimizer": {"name": "adamw", "weight_decay": 0.01,
                      "lr_schedule": "step", "warmup_steps": 3}}),
    "resnet_sync_2": (DATA_RESNET_SHORT, {
        "replicas": 2, "model": {**RESNET, "l2": 0.001},
        "keep_short_batch": True, "optimizer": SGD}),
    "resnet_sync_4": (DATA_RESNET, {"replicas": 4, "model": RESNET,
                                    "optimizer": SGD}),
    "resnet_per_replica_bn": (DATA_RESNET, {
        "replicas": 2, "steps": 3, "optimizer": SGD,
        "model": {**RESNET, "sync_batch_norm": False}}),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  return run_equivalence_batch(tmp_path_factory.mktemp("replicas"), CASES)


def test_a_wrong_regularization_is_caught_at_the_right_step(reports):
  report = reports["unscaled_regularization"]
  assert not report["passed"] and report["text"].endswith("FAIL")
  assert report["first_failing_step"] == 12
  assert "FAIL: step 12: |loss difference|" in report["text"]
  # Steps before the fault still agree.
  assert all(abs(a - b) <= 1e-6 for a, b in zip(
      report["fit_losses"][:12], report["loop_losses"][:12]))


def test_mixed_float16_on_two_replicas_matches_fit(reports):
  report = reports["mixed_float16"]
  assert report["mode"] == "same_strategy"
  assert report["dtype"] == "mixed_float16" and report["steps"] == 10
  assert_bitwise_equal_to_fit(report)


def test_a_resnet_with_dropout_under_one_strategy_is_bitwise_fit(reports):
  report = reports["resnet_same_strategy_dropout"]
  assert report["mode"] == "same_strategy" and report["dtype"] == "float32"
  assert report["compared"]["non_trainable"] == 14
  assert report["compared"]["random_states"] == 1
  assert_bitwise_equal_to_fit(report)


@pytest.mark.parametrize("case", ["resnet_sync_2", "resnet_sync_4"])
def test_synchronized_batch_norm_on_replicas_matches_one_device_fit(reports,
                                                                    case):
  report = reports[case]
  assert report["mode"] == "loop_replicas_vs_fit_one_device"
  assert report["dtype"] == "float64"
  assert report["steps"] == (11 if case == "resnet_sync_2" else 10)
  assert report["max_loss_diff"] <= 1e-12  # float64 rounding, nothing more.
  assert report["max_weight_diff"] <= 1e-10
  assert report["compared"]["non_trainable"] == 14
  assert_equivalent(report)
  assert_loss_fell(report["loop_losses"], by=0.01)


def test_per_replica_batch_norm_fails_against_one_device_fit_and_says_why(
    reports):
  report = reports["resnet_per_replica_bn"]
  assert not report["passed"]
  # From the first step: each replica normalizes by its own half.
  assert report["first_failing_step"] == 0
  assert report["max_weight_diff"] > 1e-4
  assert "each of the loop's replicas normalizes by the statistics of its " \
      "own share" in report["text"]
