"""The replica train and eval steps, and the ``tf.function``s that run them.

This is the heart of the custom loop, written the way the TensorFlow tutorial
"Custom training with tf.distribute.Strategy" does it:

- the per-example loss (``reduction=None``) is averaged over the *global*
  batch with ``tf.nn.compute_average_loss``, and ``model.losses`` are added with
  ``tf.nn.scale_regularization_loss``, so that summing gradients over replicas
  (what ``apply_gradients`` does under a strategy) gives the gradient of the
  global mean loss;
- one ``tf.function`` call runs ``num_steps`` steps in a ``tf.range`` loop over
  a tensor count, so it is traced once and Python overhead is paid per call,
  not per step;
- a step waits on the device once: to decide whether its update is applied
  (the non-finite guard). Its loss, accuracy counts and gradients travel in
  one all-reduce, and the step itself can turn uint8 pixels into its input
  (``data.preprocess``) on its device.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from research import calibration
from research import data as data_lib
from research import distribute
from research import model as model_lib
from research import optim
from research.options import NAN_POLICIES

_SUM = tf.distribute.ReduceOp.SUM
_UNCONVERTED = tf.autograph.experimental.do_not_convert


class StepRunner:
  """Runs training and evaluation steps of a model under a strategy.

  Create it (and the model and optimizer it gets) under ``strategy.scope()``.

  Each training step all-reduces the gradients once, explicitly, so the
  gradient norm, the clipping and the finiteness check see the *global*
  gradient; the optimizer must then not all-reduce again: it must have been
  through ``optim.expect_presummed_gradients`` (``training.build_training``
  does that). Keras 3 alone would clip before its own all-reduce, that is per
  replica, which is not global-norm clipping.
  """

  def __init__(self, *, strategy: tf.distribute.Strategy,
               model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer,
               global_batch_size: int, keep_short_batch: bool = False,
               jit_compile: bool = False, nan_policy: str = "stop",
               label_smoothing: float = 0.0, clip_grad_norm: float = 0.0,
               keep_last_gradients: bool = False,
               test_time_augmentation: dict | None = None):
    """Builds the step functions (they trace on first call).

    Args:
      strategy: The distribution strategy.
      model: A built model returning logits.
      optimizer: An optimizer already built on ``model.trainable_variables``
        that applies pre-summed gradients
        (``optim.expect_presummed_gradients``).
      global_batch_size: Examples per step over all replicas.
      keep_short_batch: Training batches may be short (an epoch's last). Then
        each step divides by the number of examples actually in it, summed
        over replicas, which is what ``model.fit`` on one device does; with
        full batches the constant ``global_batch_size`` is used.
      jit_compile: Compile the replica steps with XLA.
      nan_policy: What a step with a non-finite loss or gradient does; the
        update is never applied. ``stop``: the call runs no further steps and
        reports the step. ``skip``: the step is counted and training goes on.
      label_smoothing: Training targets are ``(1 - s) * one_hot + s / C``.
        Evaluation always reports the plain cross-entropy.
      clip_grad_norm: If > 0, the global gradient (over all replicas) is
        scaled down to at most this L2 norm before the update.
      keep_last_gradients: Return each call's last applied gradient (for
        histograms); off, no extra copy of the gradients stays alive.
      test_time_augmentation: How evaluation averages over views of each
        image: ``model.inference_logits``' ``flip_average`` and
        ``shift_average`` (``ModelConfig.test_time_augmentation``); None:
        no averaging.

    Raises:
      ValueError: if ``global_batch_size`` is not positive or not divisible by
        the number of replicas, ``nan_policy`` is unknown,
        ``label_smoothing``/``clip_grad_norm`` are out of range, or the
        optimizer would sum the already summed gradients again.
    """
    if nan_policy not in NAN_POLICIES:
      raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got "
                       f"{nan_policy!r}")
    replicas = strategy.num_replicas_in_sync
    if global_batch_size <= 0 or global_batch_size % replicas:
      raise ValueError(
          f"global_batch_size must be a positive multiple of the "
          f"{replicas} replicas, got {global_batch_size}")
    if not 0 <= label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got "
                       f"{label_smoothing}")
    if clip_grad_norm < 0:
      raise ValueError(f"clip_grad_norm must be >= 0, got {clip_grad_norm}")
    if not optim.applies_presummed_gradients(optimizer):
      raise ValueError("the optimizer would all-reduce the step's already "
                       "summed gradients again; pass it through "
                       "optim.expect_presummed_gradients first (as "
                       "training.build_training does)")
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.global_batch_size = global_batch_size
    self.keep_short_batch = keep_short_batch
    self.nan_policy = nan_policy
    self.label_smoothing = label_smoothing
    self.clip_grad_norm = clip_grad_norm
    self.keep_last_gradients = keep_last_gradients
    self.test_time_augmentation = dict(test_time_augmentation or {})
    # The logits' width: the last trainable variable is the output bias.
    self.num_classes = int(getattr(model, "num_classes", 0) or
                           model.trainable_variables[-1].shape[-1])
    # What a training-mode forward pass updates besides the RNG: batch
    # norm's moving statistics (the model's non-trainable weights).
    self._forward_statistics = list(model.non_trainable_weights)
    self._loss_scaling = isinstance(optimizer,
                                    tf.keras.optimizers.LossScaleOptimizer)
    # Losses are computed in float32 at least: float16/bfloat16 logits (mixed
    # precision) are upcast, float64 models keep float64.
    self.loss_dtype = (tf.float64 if model.compute_dtype == "float64"
                       else tf.float32)
    self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype=self.loss_dtype)
    self._smoothed_loss_fn = tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=label_smoothing, reduction=None,
        dtype=self.loss_dtype)
    # XLA compiles the forward and backward pass, and separately the update
    # where the strategy allows it (distribute.compiles_updates_in_xla: not
    # over mirrored variables). Without XLA the replica functions are plain
    # Python, traced into the caller: nested tf.functions must not hold a
    # cross-replica synchronization point.
    self._replica_gradients = (
        tf.function(self._replica_gradients_step, jit_compile=True)
        if jit_compile else self._replica_gradients_step)
    self._replica_apply = (
        tf.function(self._replica_apply_step, jit_compile=True)
        if jit_compile and distribute.compiles_updates_in_xla(strategy)
        else self._replica_apply_step)
    self._replica_eval = tf.function(self._replica_eval_step,
                                     jit_compile=jit_compile)
    # Their loops and conditions on tensors are written as tf.while_loop
    # and tf.cond: nothing here needs autograph.
    self.train_steps = tf.function(self._train_steps, autograph=False)
    self.eval_steps = tf.function(self._eval_steps, autograph=False)

  # Replica context: these run once per replica, under strategy.run. ------
  # Their Python branches are on settings, never on tensors: autograph need
  # not convert them (nor, then, anything they call), here nor where XLA
  # compiles them as tf.functions of their own. Converting re-parses each
  # function's source in every process: about 0.9 s of the 9 s of CPU a
  # smoke run took.

  def _step_batch_size(self, labels):
    if not self.keep_short_batch:
      return self.global_batch_size
    # A short batch: divide by the examples really in this step, over all
    # replicas, so the loss is the true mean of the step's examples.
    # Summed as float32 (exact for any batch below 2**24): collectives on
    # GPUs refuse int32 (tensorflow#56184).
    local = tf.cast(tf.shape(labels)[0], tf.float32)
    total = tf.distribute.get_replica_context().all_reduce(_SUM, local)
    return tf.cast(total, tf.int32)

  def _regularization(self):
    if not self.model.losses:
      return 0.0
    return tf.add_n([tf.cast(penalty, self.loss_dtype)
                     for penalty in self.model.losses])

  def replica_loss(self, labels, logits, global_batch_size):
    """This replica's share of the step's loss (replica context).

    Summed over replicas it is the global mean per-example loss plus the
    regularization penalty, which is what ``model.fit`` minimizes.

    Args:
      labels: This replica's labels.
      logits: This replica's logits.
      global_batch_size: Examples in the step over all replicas.
    """
    if self.label_smoothing:
      per_example = self._smoothed_loss_fn(
          tf.one_hot(labels, logits.shape[-1], dtype=self.loss_dtype), logits)
    else:
      per_example = self.loss_fn(labels, logits)
    loss = tf.nn.compute_average_loss(per_example,
                                      global_batch_size=global_batch_size)
    if self.model.losses:
      loss += tf.nn.scale_regularization_loss(self._regularization())
    return loss

  @_UNCONVERTED
  def _replica_gradients_step(self, images, labels, global_batch_size,
                              augmentation=()):
    images = _model_input(images, augmentation)
    with tf.GradientTape() as tape:
      logits = tf.cast(self.model(images, training=True), self.loss_dtype)
      loss = self.replica_loss(labels, logits, global_batch_size)
      # Identity, except for a LossScaleOptimizer (mixed_float16).
      scaled_loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
    return loss, gradients, _num_correct(logits, labels)

  @_UNCONVERTED
  def _replica_forward_backward(self, images, labels, *augmentation):
    # The training-mode forward pass moves batch norm's statistics before
    # anyone knows whether the step will be applied: keep the old values to
    # put back if it is not (a non-finite batch would poison them).
    previous_statistics = [tf.identity(v) for v in self._forward_statistics]
    loss, gradients, correct = self._replica_gradients(
        images, labels, self._step_batch_size(labels), augmentation)
    # One all-reduce for everything the step sums over replicas (exact for
    # the counts: below 2**24 examples a step). Every replica then holds the
    # global values, so the host reads any local copy, without a reduction
    # of its own (under MultiWorkerMirroredStrategy each is a collective).
    totals = tf.stack([loss, tf.cast(correct, self.loss_dtype),
                       tf.cast(tf.size(labels), self.loss_dtype)])
    gradients, totals = tf.distribute.get_replica_context().all_reduce(
        _SUM, (gradients, totals))
    if self._loss_scaling:
      # The scale is a power of two, so unscaling after the sum is exact.
      scale = tf.convert_to_tensor(self.optimizer.dynamic_scale)
      gradients = [g / tf.cast(scale, g.dtype) for g in gradients]
    norm = tf.linalg.global_norm(gradients)
    if self.clip_grad_norm:
      gradients, _ = tf.clip_by_global_norm(gradients, self.clip_grad_norm,
                                            use_norm=norm)
    return totals, gradients, norm, previous_statistics

  @_UNCONVERTED
  def _replica_restore_statistics(self, previous_statistics):
    for variable, value in zip(self._forward_statistics, previous_statistics):
      variable.assign(value)

  @_UNCONVERTED
  def _replica_eval_step(self, images, labels, weights):
    # weights: 1 for a real example, 0 for the padding of the last batch
    # (data.make_eval_dataset), which then counts nowhere.
    images = _model_input(images, ())
    logits = model_lib.inference_logits(self.model, images,
                                        dtype=self.loss_dtype,
                                        **self.test_time_augmentation)
    loss_sum = tf.reduce_sum(self.loss_fn(labels, logits) *
                             tf.cast(weights, self.loss_dtype))
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    # Counted in the loss's float type (exact below 2**24 a step) so that
    # the loss, the counts and the calibration sums travel in one
    # all-reduce.
    confusion = tf.math.confusion_matrix(
        tf.cast(labels, tf.int32), predicted, num_classes=logits.shape[-1],
        weights=weights, dtype=self.loss_dtype)
    brier_sum, bins = calibration.batch_sums(logits, labels, weights)
    return {"loss_sum": loss_sum, "confusion": confusion,
            "brier_sum": brier_sum, "bins": bins}

  @_UNCONVERTED
  def _replica_evaluate(self, images, labels, weights):
    return tf.distribute.get_replica_context().all_reduce(
        _SUM, self._replica_eval(images, labels, weights))

  @_UNCONVERTED
  def _replica_apply_step(self, gradients):
    if self._loss_scaling:
      # The LossScaleOptimizer unscales again (and skips overflowing steps).
      scale = tf.convert_to_tensor(self.optimizer.dynamic_scale)
      gradients = [g * tf.cast(scale, g.dtype) for g in gradients]
    self.optimizer.apply_gradients(
        zip(gradients, self.model.trainable_variables))

  # Cross-replica context: the multi-step tf.functions, driving the replicas.

  def _train_steps(self, iterator, num_steps):
    """Runs up to ``num_steps`` training steps.

    Returns:
      A dict: ``step_losses`` ``[num_steps]`` (each step's global mean loss
      including regularization, as minimized; float32, or float64 for a
      float64 model), ``step_grad_norms`` ``[num_steps]`` (L2 norm of each
      step's global gradient, unscaled, before clipping),
      ``step_learning_rates`` ``[num_steps]`` float32 (the rate of each
      step's update), ``correct`` and ``count`` int64 (over the steps'
      examples, before each update), ``skipped`` int32 (steps whose update
      was not applied, nor their batch-norm statistics kept, because the
      loss or a gradient was not finite),
      ``nonfinite_step`` int32 (index in this call of the first such step,
      -1 if none), and with ``keep_last_gradients`` ``last_gradients`` (the
      last applied step's gradient per trainable variable, after clipping;
      zeros if none). Under
      ``nan_policy="stop"`` no step after a non-finite one runs and its
      entries stay 0.
    """
    stop_at_nonfinite = self.nan_policy == "stop"

    def more_steps(i, nonfinite_step, *_):
      if stop_at_nonfinite:
        return tf.logical_and(i < num_steps, nonfinite_step < 0)
      return i < num_steps

    def train_step(i, nonfinite_step, losses, norms, rates, correct, count,
                   skipped, last_gradients):
      totals, gradients, norm, previous_statistics = self.strategy.run(
          self._replica_forward_backward, args=next(iterator))
      # Every replica holds the same all-reduced values: take the first.
      totals = self.strategy.experimental_local_results(totals)[0]
      step_loss = totals[0]
      norm = tf.cast(self.strategy.experimental_local_results(norm)[0],
                     self.loss_dtype)
      losses = losses.write(i, step_loss)
      norms = norms.write(i, norm)
      rates = rates.write(i, optim.current_learning_rate(self.optimizer))
      correct += tf.cast(totals[1], tf.int64)
      count += tf.cast(totals[2], tf.int64)
      if self._loss_scaling:
        # Overflowing float16 gradients are routine: the LossScaleOptimizer
        # skips them and lowers its scale. A non-finite loss is counted.
        good = tf.math.is_finite(step_loss)
      else:
        good = tf.logical_and(tf.math.is_finite(step_loss),
                              tf.math.is_finite(norm))

      def apply():
        self.strategy.run(self._replica_apply, args=(gradients,))
        applied = ([self.strategy.experimental_local_results(g)[0]
                    for g in gradients] if self.keep_last_gradients
                   else last_gradients)
        return skipped, nonfinite_step, applied

      def skip():
        if self._forward_statistics:
          self.strategy.run(self._replica_restore_statistics,
                            args=(previous_statistics,))
        return (skipped + 1, tf.where(nonfinite_step < 0, i, nonfinite_step),
                last_gradients)

      # The step's one wait on the device: an update with a non-finite
      # value must never be applied. (Applying it and restoring every
      # variable and slot when not finite would not wait, but would copy all
      # of them every step: more than the wait costs on a GPU for any but
      # the smallest models.)
      skipped, nonfinite_step, last_gradients = tf.cond(good, apply, skip)
      return (i + 1, nonfinite_step, losses, norms, rates, correct, count,
              skipped, last_gradients)

    (_, nonfinite_step, losses, norms, rates, correct, count, skipped,
     last_gradients) = tf.while_loop(more_steps, train_step, (
         tf.constant(0), tf.constant(-1),
         tf.TensorArray(self.loss_dtype, size=num_steps, element_shape=()),
         tf.TensorArray(self.loss_dtype, size=num_steps, element_shape=()),
         tf.TensorArray(tf.float32, size=num_steps, element_shape=()),
         tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(0),
         [tf.zeros(v.shape, v.dtype) for v in self.model.trainable_variables]
         if self.keep_last_gradients else []))
    out = {"step_losses": losses.stack(), "step_grad_norms": norms.stack(),
           "step_learning_rates": rates.stack(), "correct": correct,
           "count": count, "skipped": skipped,
           "nonfinite_step": nonfinite_step}
    if self.keep_last_gradients:
      out["last_gradients"] = last_gradients
    return out

  def _eval_steps(self, iterator, num_steps):
    """Runs ``num_steps`` evaluation steps.

    Returns:
      A dict, summed over all replicas and steps, of float64 ``loss_sum``
      (per-example cross-entropy), int64 ``confusion`` (``[C, C]``, rows
      true classes, columns predictions), and float64 ``brier_sum`` and
      ``bins`` (``calibration.batch_sums``).
    """
    num_classes = self.num_classes
    sums = {"loss_sum": tf.constant(0.0, tf.float64),
            "confusion": tf.zeros([num_classes, num_classes], tf.int64),
            "brier_sum": tf.constant(0.0, tf.float64),
            "bins": tf.zeros([3, calibration.NUM_BINS], tf.float64)}

    def eval_step(i, sums):
      step = self.strategy.experimental_local_results(
          self.strategy.run(self._replica_evaluate, args=next(iterator)))[0]
      return i + 1, {name: total + tf.cast(step[name], total.dtype)
                     for name, total in sums.items()}

    return tf.while_loop(lambda i, _: i < num_steps, eval_step,
                         (tf.constant(0), sums))[1]

  def evaluate(self, dist_dataset, num_steps: int, steps_per_call: int = 100
               ) -> dict:
    """Evaluates over a distributed dataset of exactly ``num_steps`` steps.

    Args:
      dist_dataset: A distributed eval dataset (every example once).
      num_steps: Its number of steps.
      steps_per_call: Steps per ``tf.function`` call.

    Returns:
      ``{"loss", "accuracy", "correct", "count", "confusion",
      "class_accuracy", "nll", "brier", "ece", "reliability"}``: loss is the
      mean per-example cross-entropy plus the regularization penalty (as
      ``model.evaluate`` reports it); accuracy is correct / count;
      ``confusion`` is the ``[C, C]`` int64 numpy confusion matrix (rows
      true classes); ``class_accuracy`` the ``[C]`` recall of each class
      (NaN for a class with no examples); the rest as
      ``calibration.metrics`` gives them.
    """
    iterator = iter(dist_dataset)
    sums = None
    done = 0
    while done < num_steps:
      call_steps = min(steps_per_call, num_steps - done)
      out = {name: value.numpy() for name, value in
             self.eval_steps(iterator, tf.constant(call_steps)).items()}
      sums = out if sums is None else {name: sums[name] + out[name]
                                       for name in sums}
      done += call_steps
    confusion = sums["confusion"]
    loss_sum = float(sums["loss_sum"])
    count = int(confusion.sum())
    correct = int(np.trace(confusion))
    per_class = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      class_accuracy = np.diag(confusion) / per_class
    regularization = float(self._regularization())
    return {"loss": loss_sum / max(count, 1) + regularization,
            "accuracy": correct / max(count, 1),
            "correct": correct, "count": count, "confusion": confusion,
            "class_accuracy": class_accuracy,
            **calibration.metrics(loss_sum=loss_sum,
                                  brier_sum=float(sums["brier_sum"]),
                                  bins=sums["bins"], count=count)}


def _model_input(images, augmentation):
  """What the model takes: uint8 pixels are preprocessed here, on the
  replica's device (``data.preprocess``); float images came preprocessed."""
  if images.dtype != tf.uint8:
    return images
  return data_lib.preprocess(images, *augmentation)


def _num_correct(logits, labels):
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)),
                               tf.int64))
