"""Calibration metrics (research/calibration.py) against plain numpy."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import convnet_training
from research import calibration
from research import data as data_lib
from research import distribute


def _reference(logits, labels, bins=15):
  """nll, Brier and ECE as the textbook writes them, one example at a
  time."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  n, classes = p.shape
  nll = -np.mean(np.log(p[np.arange(n), labels]))
  brier = np.mean(((p - np.eye(classes)[labels]) ** 2).sum(axis=1))
  confidence = p.max(axis=1)
  correct = p.argmax(axis=1) == labels
  ece = 0.0
  for b in range(bins):
    upper = confidence < (b + 1) / bins if b < bins - 1 else confidence <= 1
    members = (confidence >= b / bins) & upper
    if members.any():
      ece += members.mean() * abs(correct[members].mean() -
                                  confidence[members].mean())
  return nll, brier, ece


def _metrics(logits, labels, weights=None):
  logits = tf.constant(logits, tf.float32)
  weights = tf.ones(len(labels)) if weights is None else weights
  brier_sum, bins = calibration.batch_sums(logits, tf.constant(labels),
                                           weights)
  loss_sum = float(tf.reduce_sum(
      tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits) *
      weights))
  return calibration.metrics(loss_sum=loss_sum, brier_sum=float(brier_sum),
                             bins=bins.numpy(),
                             count=int(tf.reduce_sum(weights)))


def test_random_logits_match_the_textbook_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (500, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 500).astype(np.int32)
  got = _metrics(logits, labels)
  nll, brier, ece = _reference(logits, labels)
  assert got["nll"] == pytest.approx(nll, rel=1e-5)
  assert got["brier"] == pytest.approx(brier, rel=1e-5)
  assert got["ece"] == pytest.approx(ece, abs=1e-6)
  assert got["ece"] > 0.05  # Random logits are badly calibrated.
  assert got["reliability"]["count"].sum() == 500


def test_padding_rows_count_nowhere():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (40, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 40).astype(np.int32)
  weights = tf.constant([1.0] * 30 + [0.0] * 10)
  got = _metrics(logits, labels, weights)
  nll, brier, ece = _reference(logits[:30], labels[:30])
  assert (got["nll"], got["brier"]) == pytest.approx((nll, brier), rel=1e-5)
  assert got["ece"] == pytest.approx(ece, abs=1e-6)


def test_a_perfectly_calibrated_and_an_over_confident_model():
  # Confidence 0.7 on class 0 for every example, and 70 % are class 0.
  calibrated = np.tile(np.log([[0.7, 0.3]]), (100, 1)).astype(np.float32)
  labels = np.array([0] * 70 + [1] * 30, np.int32)
  got = _metrics(calibrated, labels)
  assert got["ece"] == pytest.approx(0.0, abs=1e-6)
  assert got["brier"] == pytest.approx(0.42, abs=1e-6)  # 2 * 0.7 * 0.3
  # Confidence 0.99 on class 0, right half of the time.
  confident = np.tile(np.log([[0.99, 0.01]]), (100, 1)).astype(np.float32)
  labels = np.array([0, 1] * 50, np.int32)
  got = _metrics(confident, labels)
  assert got["ece"] == pytest.approx(0.49, abs=1e-6)
  assert got["nll"] == pytest.approx(-(np.log(0.99) + np.log(0.01)) / 2,
                                     rel=1e-5)
  bin_of_099 = int(0.99 * 15)
  assert got["reliability"]["count"][bin_of_099] == 100
  assert got["reliability"]["accuracy"][bin_of_099] == pytest.approx(0.5)
  assert np.isnan(got["reliability"]["accuracy"][0])  # An empty bin.


def test_the_runner_reports_them_over_replicas_and_padding():
  """11 examples on 2 replicas of 4 (the last batch padded): the same
  numbers as numpy over the model's own logits."""
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  strategy = distribute.mirrored_strategy(cpus[:2])
  _, runner = convnet_training(strategy, global_batch_size=8)
  data = data_lib.make_synthetic(num_train=16, num_test=11, seed=3)
  result = runner.evaluate(
      strategy.distribute_datasets_from_function(
          lambda context: data_lib.make_eval_dataset(
              data, global_batch_size=8, input_context=context)),
      data_lib.eval_steps(11, 8))
  logits = runner.model(data_lib.to_float(data.test_images)).numpy()
  nll, brier, ece = _reference(logits, data.test_labels)
  assert result["nll"] == pytest.approx(nll, rel=1e-5)
  assert result["nll"] == pytest.approx(result["loss"])  # No penalty.
  assert result["brier"] == pytest.approx(brier, rel=1e-5)
  assert result["ece"] == pytest.approx(ece, abs=1e-5)
  assert result["reliability"]["count"].sum() == 11
