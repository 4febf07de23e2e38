"""Optimizers and learning-rate schedules.

Every schedule is a Keras ``LearningRateSchedule`` of the optimizer's step
(``optimizer.iterations``): a linear warmup over the first ``warmup_steps``
steps, then a decay over the rest of training.

- ``constant``: ``base``.
- ``cosine``: ``base * (1 + cos(pi * t / T)) / 2`` with ``t`` the steps since
  warmup and ``T`` the steps after warmup (Keras' ``CosineDecay``, alpha 0).
- ``step``: ``base * rate ** floor(t / decay_steps)`` (staircase).
- ``exponential``: ``base * rate ** (t / decay_steps)``.

Warmup: ``base * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so
the first update is not wasted at rate 0 and step ``warmup_steps - 1`` runs at
``base``.
"""

from __future__ import annotations

import tensorflow as tf

from research.config import OptimizerConfig


class LinearWarmup(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to ``peak``, then ``after(step - warmup_steps)``."""

  def __init__(self, *, peak: float, warmup_steps: int,
               after: tf.keras.optimizers.schedules.LearningRateSchedule):
    self.peak = peak
    self.warmup_steps = warmup_steps
    self.after = after

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = tf.cast(self.warmup_steps, tf.float32)
    return tf.where(step < warmup,
                    self.peak * (step + 1.0) / tf.maximum(warmup, 1.0),
                    tf.cast(self.after(tf.maximum(step - warmup, 0.0)),
                            tf.float32))

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps,
            "after": tf.keras.optimizers.schedules.serialize(self.after)}


class _Constant(tf.keras.optimizers.schedules.LearningRateSchedule):

  def __init__(self, value: float):
    self.value = value

  def __call__(self, step):
    del step
    return tf.constant(self.value, tf.float32)

  def get_config(self):
    return {"value": self.value}


def make_schedule(config: OptimizerConfig, *, total_steps: int):
  """The learning rate of a run: a float, or a schedule of the step.

  ``constant`` without warmup is a plain float, so the optimizer holds it in
  a variable exactly as ``model.fit``'s optimizer does.

  Args:
    config: The schedule's settings, validated by ``OptimizerConfig``:
      ``lr_schedule``; ``learning_rate``, the peak, reached at the end of
      ``warmup_steps`` of linear warmup (fewer than ``total_steps``:
      ``train.cadence_of`` refuses a run where they are not);
      ``lr_decay_rate``, the ``step``/``exponential`` factor per
      ``lr_decay_steps`` steps (0: a third of the post-warmup steps for
      ``step``, two drops; all of them for ``exponential``, the rate
      reached at the end).
    total_steps: Optimizer steps in the whole run.

  Returns:
    A float or a ``LearningRateSchedule``.
  """
  name, base_learning_rate = config.lr_schedule, config.learning_rate
  warmup_steps = config.warmup_steps
  decay_rate, decay_steps = config.lr_decay_rate, config.lr_decay_steps
  if name == "constant" and not warmup_steps:
    return base_learning_rate
  decay_total = max(total_steps - warmup_steps, 1)
  schedules = tf.keras.optimizers.schedules
  if name == "constant":
    after = _Constant(base_learning_rate)
  elif name == "cosine":
    after = schedules.CosineDecay(base_learning_rate, decay_total, alpha=0.0)
  elif name == "step":
    after = schedules.ExponentialDecay(
        base_learning_rate, decay_steps or max(decay_total // 3, 1),
        decay_rate, staircase=True)
  else:
    after = schedules.ExponentialDecay(
        base_learning_rate, decay_steps or decay_total, decay_rate)
  return LinearWarmup(peak=base_learning_rate, warmup_steps=warmup_steps,
                      after=after)


def make_optimizer(config: OptimizerConfig, learning_rate,
                   mixed_precision: str = "float32"
                   ) -> tf.keras.optimizers.Optimizer:
  """A Keras optimizer, wrapped in a ``LossScaleOptimizer`` for float16.

  float16 gradients underflow without loss scaling; bfloat16's range is
  float32's, so it needs none. Create it under ``strategy.scope()``.

  Args:
    config: The optimizer's settings (validated by ``OptimizerConfig``):
      ``name`` ``adam``, ``adamw`` (Adam with decoupled weight decay) or
      ``sgd`` (with ``momentum``, optionally ``nesterov``);
      ``weight_decay``, decoupled, per step, times the learning rate (Keras'
      ``weight_decay``; ``adamw`` and ``adam`` with the same value are the
      same update); ``ema_decay``: if > 0, the optimizer also keeps an
      exponential moving average of the weights (Keras' ``use_ema``): after
      each applied update ``average = d * average + (1 - d) * weight``, and
      ``average = weight`` after the first. ``averaged_weights`` reads it.
      Its ``learning_rate`` is not used: ``learning_rate`` is.
    learning_rate: A float or a schedule (``make_schedule``).
    mixed_precision: The Keras dtype policy of the model.
  """
  name, weight_decay = config.name, config.weight_decay
  momentum, nesterov = config.momentum, config.nesterov
  ema_decay = config.ema_decay
  decay = weight_decay or None
  # Keras' own average: updated inside apply(), so a skipped step skips it
  # too, under any strategy (its TensorFlow backend updates each replica's
  # copy); its variables are the optimizer's, so checkpoints hold them.
  ema = {"use_ema": ema_decay > 0, "ema_momentum": ema_decay or 0.99}
  if name == "adam":
    optimizer = tf.keras.optimizers.Adam(learning_rate=learning_rate,
                                         weight_decay=decay, **ema)
  elif name == "adamw":
    optimizer = tf.keras.optimizers.AdamW(learning_rate=learning_rate,
                                          weight_decay=weight_decay, **ema)
  else:
    optimizer = tf.keras.optimizers.SGD(learning_rate=learning_rate,
                                        momentum=momentum, nesterov=nesterov,
                                        weight_decay=decay, **ema)
  if mixed_precision == "mixed_float16":
    optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def expect_presummed_gradients(optimizer: tf.keras.optimizers.Optimizer
                               ) -> None:
  """Makes ``optimizer`` apply gradients already summed over replicas.

  A custom loop that needs the global gradient before the update (its norm,
  global-norm clipping) all-reduces it itself; the optimizer must then not
  sum it again. Keras 2 had ``apply_gradients(...,
  experimental_aggregate_gradients=False)`` for this; Keras 3 has no switch
  (keras-team/keras#19308), so this replaces its TensorFlow backend's one
  aggregation hook on this instance (for a ``LossScaleOptimizer``, on its
  inner optimizer). tests/test_equivalence.py checks that 2 replicas still
  equal one device, which fails if the gradients are summed twice or never.

  Raises:
    RuntimeError: if this Keras has no such hook (another Keras version).
  """
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  if not hasattr(inner, "_all_reduce_sum_gradients"):
    raise RuntimeError(
        f"this Keras ({tf.keras.__version__}) optimizer has no "
        f"_all_reduce_sum_gradients hook; research/optim.py needs updating")
  inner._all_reduce_sum_gradients = list  # pylint: disable=protected-access


def applies_presummed_gradients(optimizer: tf.keras.optimizers.Optimizer
                                ) -> bool:
  """Whether ``expect_presummed_gradients`` was applied to ``optimizer``."""
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  return vars(inner).get("_all_reduce_sum_gradients") is list


def averaged_weights(optimizer: tf.keras.optimizers.Optimizer
                     ) -> list[tf.Variable] | None:
  """The optimizer's moving averages of the trainable weights, in the order
  of the variables it was built on; None without ``ema_decay``.

  Raises:
    RuntimeError: if this Keras keeps its averages elsewhere (another Keras
      version).
  """
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  if not inner.use_ema:
    return None
  averages = getattr(inner, "_model_variables_moving_average", None)
  if averages is None:
    raise RuntimeError(
        f"this Keras ({tf.keras.__version__}) optimizer keeps no "
        f"_model_variables_moving_average; research/optim.py needs updating")
  return list(averages)


def current_learning_rate(optimizer: tf.keras.optimizers.Optimizer
                          ) -> tf.Tensor:
  """The rate the optimizer's next update uses (float32 scalar)."""
  return tf.cast(optimizer.learning_rate, tf.float32)
