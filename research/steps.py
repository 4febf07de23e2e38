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
  not per step.
"""

from __future__ import annotations

import tensorflow as tf

_SUM = tf.distribute.ReduceOp.SUM
NAN_POLICIES = ("stop", "skip")


def make_optimizer(learning_rate: float, mixed_precision: str = "float32"
                   ) -> tf.keras.optimizers.Optimizer:
  """Adam, wrapped in a ``LossScaleOptimizer`` for ``mixed_float16``.

  float16 gradients underflow without loss scaling; bfloat16's range is
  float32's, so it needs none. Create it under ``strategy.scope()``.
  """
  optimizer = tf.keras.optimizers.Adam(learning_rate=learning_rate)
  if mixed_precision == "mixed_float16":
    optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


class StepRunner:
  """Runs training and evaluation steps of a model under a strategy.

  Create it (and the model and optimizer it gets) under ``strategy.scope()``.
  """

  def __init__(self, *, strategy: tf.distribute.Strategy,
               model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer,
               global_batch_size: int, keep_short_batch: bool = False,
               jit_compile: bool = False, nan_policy: str = "stop"):
    """Builds the step functions (they trace on first call).

    Args:
      strategy: The distribution strategy.
      model: A built model returning logits.
      optimizer: An optimizer already built on ``model.trainable_variables``.
      global_batch_size: Examples per step over all replicas.
      keep_short_batch: Training batches may be short (an epoch's last). Then
        each step divides by the number of examples actually in it, summed
        over replicas, which is what ``model.fit`` on one device does; with
        full batches the constant ``global_batch_size`` is used.
      jit_compile: Compile the replica steps with XLA.
      nan_policy: What a step with a non-finite loss or gradient does; the
        update is never applied. ``stop``: the call runs no further steps and
        reports the step. ``skip``: the step is counted and training goes on.

    Raises:
      ValueError: if ``global_batch_size`` is not positive or not divisible by
        the number of replicas, or ``nan_policy`` is unknown.
    """
    if nan_policy not in NAN_POLICIES:
      raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got "
                       f"{nan_policy!r}")
    replicas = strategy.num_replicas_in_sync
    if global_batch_size <= 0 or global_batch_size % replicas:
      raise ValueError(
          f"global_batch_size must be a positive multiple of the "
          f"{replicas} replicas, got {global_batch_size}")
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.global_batch_size = global_batch_size
    self.keep_short_batch = keep_short_batch
    self.nan_policy = nan_policy
    self._loss_scaling = isinstance(optimizer,
                                    tf.keras.optimizers.LossScaleOptimizer)
    # Losses are computed in float32 at least: float16/bfloat16 logits (mixed
    # precision) are upcast, float64 models keep float64.
    self.loss_dtype = (tf.float64 if model.compute_dtype == "float64"
                       else tf.float32)
    self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype=self.loss_dtype)
    # XLA compiles the forward and backward pass, and separately the update
    # (which, with several replicas, touches mirrored variables on every
    # replica's device: one XLA cluster cannot span them). Without XLA the
    # replica functions are plain Python, traced into the caller: nested
    # tf.functions must not hold a cross-replica synchronization point.
    self._replica_gradients = (
        tf.function(self._replica_gradients_step, jit_compile=True)
        if jit_compile else self._replica_gradients_step)
    self._replica_apply = (
        tf.function(self._replica_apply_step, jit_compile=True)
        if jit_compile and replicas == 1 else self._replica_apply_step)
    self._replica_eval = tf.function(self._replica_eval_step,
                                     jit_compile=jit_compile)
    self.train_steps = tf.function(self._train_steps)
    self.eval_steps = tf.function(self._eval_steps)

  # Replica context -------------------------------------------------------

  def _step_batch_size(self, labels):
    if not self.keep_short_batch:
      return self.global_batch_size
    # A short batch: divide by the examples really in this step, over all
    # replicas, so the loss is the true mean of the step's examples.
    local = tf.shape(labels)[0]
    return tf.distribute.get_replica_context().all_reduce(_SUM, local)

  def _regularization(self):
    if not self.model.losses:
      return 0.0
    return tf.add_n([tf.cast(l, self.loss_dtype) for l in self.model.losses])

  def replica_loss(self, labels, logits, global_batch_size):
    """This replica's share of the step's loss (replica context).

    Summed over replicas it is the global mean per-example loss plus the
    regularization penalty, which is what ``model.fit`` minimizes.

    Args:
      labels: This replica's labels.
      logits: This replica's logits.
      global_batch_size: Examples in the step over all replicas.
    """
    per_example = self.loss_fn(labels, logits)
    loss = tf.nn.compute_average_loss(per_example,
                                      global_batch_size=global_batch_size)
    if self.model.losses:
      loss += tf.nn.scale_regularization_loss(self._regularization())
    return loss

  def _replica_gradients_step(self, images, labels, global_batch_size):
    with tf.GradientTape() as tape:
      logits = tf.cast(self.model(images, training=True), self.loss_dtype)
      loss = self.replica_loss(labels, logits, global_batch_size)
      # Identity, except for a LossScaleOptimizer (mixed_float16), whose
      # apply_gradients unscales the gradients again.
      scaled_loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
    nonfinite = tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.int32)
    if not self._loss_scaling:
      # With loss scaling, overflowing gradients are routine: the
      # LossScaleOptimizer skips them and lowers its scale by itself.
      for g in gradients:
        nonfinite += tf.cast(
            tf.logical_not(tf.reduce_all(tf.math.is_finite(g))), tf.int32)
    return loss, gradients, _num_correct(logits, labels), nonfinite

  def _replica_forward_backward(self, images, labels):
    loss, gradients, correct, nonfinite = self._replica_gradients(
        images, labels, self._step_batch_size(labels))
    return loss, gradients, correct, tf.size(labels, tf.int64), nonfinite

  def _replica_apply_step(self, gradients):
    self.optimizer.apply_gradients(
        zip(gradients, self.model.trainable_variables))

  def _replica_eval_step(self, images, labels):
    logits = tf.cast(self.model(images, training=False), self.loss_dtype)
    loss_sum = tf.reduce_sum(self.loss_fn(labels, logits))
    return loss_sum, _num_correct(logits, labels), tf.size(labels, tf.int64)

  # Cross-replica context -------------------------------------------------

  def _train_steps(self, iterator, num_steps):
    """Runs up to ``num_steps`` training steps.

    Returns:
      A dict: ``step_losses`` ``[num_steps]`` (each step's global mean loss
      including regularization, as minimized; float32, or float64 for a
      float64 model), ``correct`` and ``count`` int64 (over the steps'
      examples, before each update), ``skipped`` int32 (steps whose update
      was not applied because the loss or a gradient was not finite),
      ``nonfinite_step`` int32 (index in this call of the first such step,
      -1 if none). Under ``nan_policy="stop"`` no step after it runs and its
      ``step_losses`` entries stay 0.
    """
    losses = tf.TensorArray(self.loss_dtype, size=num_steps, element_shape=())
    correct = tf.constant(0, tf.int64)
    count = tf.constant(0, tf.int64)
    skipped = tf.constant(0)
    nonfinite_step = tf.constant(-1)
    for i in tf.range(num_steps):
      if self.nan_policy == "stop" and nonfinite_step >= 0:
        break
      loss, gradients, c, n, bad = self.strategy.run(
          self._replica_forward_backward, args=next(iterator))
      losses = losses.write(i, self.strategy.reduce(_SUM, loss, axis=None))
      correct += self.strategy.reduce(_SUM, c, axis=None)
      count += self.strategy.reduce(_SUM, n, axis=None)
      # Checked over all replicas, so every replica takes the same branch.
      if self.strategy.reduce(_SUM, bad, axis=None) == 0:
        self.strategy.run(self._replica_apply, args=(gradients,))
      else:
        skipped += 1
        if nonfinite_step < 0:
          nonfinite_step = i
    return {"step_losses": losses.stack(), "correct": correct,
            "count": count, "skipped": skipped,
            "nonfinite_step": nonfinite_step}

  def _eval_steps(self, iterator, num_steps):
    """Runs ``num_steps`` evaluation steps.

    Returns:
      A dict of float64 ``loss_sum`` and int64 ``correct`` and ``count``,
      summed over all replicas and steps.
    """
    loss_sum = tf.constant(0.0, tf.float64)
    correct = tf.constant(0, tf.int64)
    count = tf.constant(0, tf.int64)
    for _ in tf.range(num_steps):
      l, c, n = self.strategy.run(self._replica_eval, args=next(iterator))
      loss_sum += tf.cast(self.strategy.reduce(_SUM, l, axis=None), tf.float64)
      correct += self.strategy.reduce(_SUM, c, axis=None)
      count += self.strategy.reduce(_SUM, n, axis=None)
    return {"loss_sum": loss_sum, "correct": correct, "count": count}

  def evaluate(self, dist_dataset, num_steps: int, steps_per_call: int = 100
               ) -> dict:
    """Evaluates over a distributed dataset of exactly ``num_steps`` steps.

    Args:
      dist_dataset: A distributed eval dataset (every example once).
      num_steps: Its number of steps.
      steps_per_call: Steps per ``tf.function`` call.

    Returns:
      ``{"loss", "accuracy", "correct", "count"}``: loss is the mean
      per-example loss plus the regularization penalty (as
      ``model.evaluate`` reports it); accuracy is correct / count.
    """
    iterator = iter(dist_dataset)
    loss_sum, correct, count = 0.0, 0, 0
    done = 0
    while done < num_steps:
      n = min(steps_per_call, num_steps - done)
      out = self.eval_steps(iterator, tf.constant(n))
      loss_sum += float(out["loss_sum"])
      correct += int(out["correct"])
      count += int(out["count"])
      done += n
    regularization = float(self._regularization())
    return {"loss": loss_sum / max(count, 1) + regularization,
            "accuracy": correct / max(count, 1),
            "correct": correct, "count": count}


def _num_correct(logits, labels):
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)),
                               tf.int64))
