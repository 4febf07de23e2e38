"""How well an evaluation's confidences match its accuracy.

Every evaluation reports, besides the loss and accuracy:

- ``nll``: the mean negative log-likelihood of the true class (the
  cross-entropy, without the regularization penalty that ``loss`` adds);
- ``brier``: the mean over examples of ``sum_c (p_c - y_c)**2`` (the
  multi-class Brier score, 0 for perfect confident answers, at most 2);
- ``ece``: the expected calibration error over ``NUM_BINS`` equal-width bins
  of the top label's confidence (bin ``b`` holds confidences in
  ``[b/15, (b+1)/15)``, the last also 1.0): ``sum_b |correct_b - conf_b| / N``
  with ``correct_b`` and ``conf_b`` the bin's sums of correct answers and of
  confidences (Guo et al. 2017, "On Calibration of Modern Neural Networks").

The eval step computes per-batch sums (``batch_sums``, in TensorFlow, so they
add over replicas and steps); ``metrics`` turns the run's sums into the
numbers.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

NUM_BINS = 15


def batch_sums(logits, labels, weights):
  """A batch's calibration sums (any float type: that of ``logits``).

  Args:
    logits: ``[b, C]``.
    labels: ``[b]`` integer class ids.
    weights: ``[b]``: 1 for an example, 0 for padding (it counts nowhere).

  Returns:
    ``(brier_sum, bins)``: the weighted sum of each example's Brier score,
    and ``bins`` ``[3, NUM_BINS]``: per confidence bin the weight (examples),
    the sum of confidences and the sum of correct answers.
  """
  dtype = logits.dtype
  weights = tf.cast(weights, dtype)
  probabilities = tf.nn.softmax(logits)
  one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=dtype)
  brier_sum = tf.reduce_sum(
      weights * tf.reduce_sum(tf.square(probabilities - one_hot), axis=-1))
  confidence = tf.reduce_max(probabilities, axis=-1)
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  correct = tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), dtype)
  bin_ids = tf.minimum(tf.cast(confidence * NUM_BINS, tf.int32),
                       NUM_BINS - 1)
  # A NaN confidence (NaN logits) casts to a different id on each device
  # type: bin 0 everywhere, so that the ECE is NaN, like the loss.
  bin_ids = tf.where(tf.math.is_finite(confidence), bin_ids, 0)
  columns = tf.stack([weights, weights * confidence, weights * correct],
                     axis=1)
  bins = tf.transpose(tf.math.unsorted_segment_sum(columns, bin_ids,
                                                   NUM_BINS))
  return brier_sum, bins


def metrics(*, loss_sum: float, brier_sum: float, bins: np.ndarray,
            count: int) -> dict:
  """The calibration numbers from an evaluation's summed ``batch_sums``.

  Args:
    loss_sum: Summed per-example cross-entropy.
    brier_sum: Summed Brier scores.
    bins: ``[3, NUM_BINS]`` summed bins.
    count: Examples evaluated.

  Returns:
    ``{"nll", "brier", "ece", "reliability"}``; ``reliability`` holds, per
    bin, ``count``, mean ``confidence`` and ``accuracy`` (NaN for an empty
    bin), for the reliability diagram.
  """
  bins = np.asarray(bins, np.float64)
  examples, confidences, corrects = bins
  total = max(count, 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    reliability = {"count": examples.round().astype(np.int64),
                   "confidence": confidences / examples,
                   "accuracy": corrects / examples}
  return {"nll": loss_sum / total, "brier": brier_sum / total,
          "ece": float(np.abs(corrects - confidences).sum() / total),
          "reliability": reliability}
