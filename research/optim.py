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

from research.options import LR_SCHEDULES, OPTIMIZERS


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


def make_schedule(name: str, *, base_learning_rate: float, total_steps: int,
                  warmup_steps: int = 0, decay_rate: float = 0.1,
                  decay_steps: int = 0):
  """The learning rate of a run: a float, or a schedule of the step.

  ``constant`` without warmup is a plain float, so the optimizer holds it in
  a variable exactly as ``model.fit``'s optimizer does.

  Args:
    name: One of ``LR_SCHEDULES``.
    base_learning_rate: The peak rate (reached at the end of warmup).
    total_steps: Optimizer steps in the whole run.
    warmup_steps: Steps of linear warmup (may be 0).
    decay_rate: ``step``/``exponential``: factor per ``decay_steps``.
    decay_steps: ``step``/``exponential``: steps per factor of
      ``decay_rate``; 0 means a third of the post-warmup steps for ``step``
      (two drops) and all of them for ``exponential`` (``decay_rate`` reached
      at the end).

  Returns:
    A float or a ``LearningRateSchedule``.

  Raises:
    ValueError: for an unknown name or out-of-range numbers.
  """
  if name not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got "
                     f"{name!r}")
  if not base_learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {base_learning_rate}")
  if not 0 <= warmup_steps < max(total_steps, 1):
    raise ValueError(f"warmup_steps must be in [0, {total_steps}) (the "
                     f"run's steps), got {warmup_steps}")
  if not 0 < decay_rate <= 1:
    raise ValueError(f"lr_decay_rate must be in (0, 1], got {decay_rate}")
  if decay_steps < 0:
    raise ValueError(f"lr_decay_steps must be >= 0, got {decay_steps}")
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


def make_optimizer(learning_rate, mixed_precision: str = "float32", *,
                   name: str = "adam", weight_decay: float = 0.0,
                   momentum: float = 0.9, nesterov: bool = False,
                   ema_decay: float = 0.0
                   ) -> tf.keras.optimizers.Optimizer:
  """A Keras optimizer, wrapped in a ``LossScaleOptimizer`` for float16.

  float16 gradients underflow without loss scaling; bfloat16's range is
  float32's, so it needs none. Create it under ``strategy.scope()``.

  Args:
    learning_rate: A float or a schedule (``make_schedule``).
    mixed_precision: The Keras dtype policy of the model.
    name: ``adam``, ``adamw`` (Adam with decoupled weight decay) or ``sgd``
      (with ``momentum``, optionally Nesterov's).
    weight_decay: Decoupled weight decay per step, times the learning rate
      (Keras' ``weight_decay``); 0 turns it off. ``adamw`` and ``adam`` with
      the same value are the same update.
    momentum: ``sgd`` only.
    nesterov: ``sgd`` only.
    ema_decay: If > 0, the optimizer also keeps an exponential moving
      average of the weights (Keras' ``use_ema``): after each applied update
      ``average = d * average + (1 - d) * weight``, and ``average = weight``
      after the first. ``averaged_weights`` reads it.

  Raises:
    ValueError: for an unknown name or a number out of range.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if not 0 <= ema_decay < 1:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
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
