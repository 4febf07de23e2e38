"""Layers the registered models share: dropout that is right under a strategy,
synchronized batch norm with one all-reduce, and batch norm on TensorFlow's
fused kernel.

Keras 3's ``Dropout`` draws its masks from a ``SeedGenerator`` whose state (an
int64 ``[seed, counter]`` variable) has two gaps for a training loop:

* Under ``MirroredStrategy`` the state is mirrored, so every replica draws
  the *same* mask for its own, different examples. ``ReplicaDropout`` folds
  the replica's id into the seed when there is more than one replica; on one
  device it draws exactly the masks of stock ``Dropout``.
* The state is not among ``model.weights``, so ``tf.train.Checkpoint(model=
  ...)`` does not save it and a resumed run would replay the first masks.
  ``rng_states`` lists every such state for the training checkpoint (and for
  copying one model's randomness into another).
"""

from __future__ import annotations

import tensorflow as tf

# The floor-mod Keras applies to a seed before a stateless op
# (keras/src/backend/tensorflow/random.py, ``_cast_seed``).
_INT32_SEED_MODULUS = tf.int32.max - 1


class ReplicaSeedGenerator(tf.keras.random.SeedGenerator):
  """A ``SeedGenerator`` whose seeds differ between the replicas of a step.

  Every replica advances the (mirrored) state alike, so its copies stay
  equal; with more than one replica in sync, each replica's seed is the
  shared one with its replica id folded in.
  """

  def next(self, ordered=True):
    seed = super().next(ordered)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
      return seed
    seed = tf.cast(tf.math.floormod(seed, _INT32_SEED_MODULUS), tf.int32)
    return tf.random.experimental.stateless_fold_in(
        seed, context.replica_id_in_sync_group)


class ReplicaDropout(tf.keras.layers.Layer):
  """``Dropout`` whose replicas draw their own masks (see the module doc).

  Subclasses ``Layer``, not ``Dropout``: Keras locks ``Dropout``'s tracked
  attributes after its ``__init__``, so its seed generator cannot be swapped.
  """

  def __init__(self, rate: float, *, seed: int | None = None, **kwargs):
    """Args:
      rate: Fraction of the inputs zeroed in training, in ``[0, 1)``.
      seed: Initial seed of the masks; None: drawn from Keras' global
        seed (``keras.utils.set_random_seed``).
      **kwargs: ``Layer`` arguments (``name``, ``dtype``).

    Raises:
      ValueError: if ``rate`` is outside ``[0, 1)``.
    """
    if not 0 <= rate < 1:
      raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    super().__init__(**kwargs)
    self.rate = rate
    self.seed_generator = ReplicaSeedGenerator(seed)
    self.built = True

  def call(self, inputs, training=False):
    if not training or self.rate == 0:
      return inputs
    return tf.keras.random.dropout(inputs, self.rate,
                                   seed=self.seed_generator)

  def get_config(self):
    return {**super().get_config(), "rate": self.rate}


class BatchNormalization(tf.keras.layers.BatchNormalization):
  """Keras' ``BatchNormalization`` whose synchronized statistics cost one
  all-reduce a training pass instead of three.

  Keras 3 all-reduces the sum, the sum of squares and the count of a
  synchronized layer one by one (``_compute_moments_sync``), and the
  gradients of the two sums again one by one: five collectives a layer and
  step, 95 for ResNet-20, each a rendezvous of every replica (a network
  round trip between hosts). Here the three travel stacked in one tensor,
  so a layer costs one collective forward and one backward. The sums, and so the
  batch statistics, are Keras' to the bit (the same reductions, summed
  element by element); only the gradient's float rounding can differ.
  Per-replica statistics, a mask and the cross-replica context are Keras'
  own path. Its variables and checkpoint names are Keras'.
  """

  def _moments(self, inputs, mask):
    context = tf.distribute.get_replica_context()
    if not self.synchronized or mask is not None or context is None:
      return super()._moments(inputs, mask)
    axes = self._reduction_axes
    total = tf.reduce_sum(inputs, axis=axes)
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(inputs), axes)),
                    inputs.dtype)
    local = tf.stack([total, tf.reduce_sum(tf.square(inputs), axis=axes),
                      tf.fill(tf.shape(total), count)])
    total, total_of_squares, count = tf.unstack(
        context.all_reduce(tf.distribute.ReduceOp.SUM, local))
    mean = tf.math.divide_no_nan(total, count)
    # var = E(x^2) - E(x)^2, as Keras computes it.
    variance = tf.maximum(
        tf.math.divide_no_nan(total_of_squares, count) - tf.square(mean), 0.0)
    return mean, variance


class FusedBatchNormalization(BatchNormalization):
  """Keras' ``BatchNormalization`` whose training-mode pass runs TensorFlow's
  fused kernel (``FusedBatchNormV3``, oneDNN's on CPUs, cuDNN's on GPUs).

  Keras 3 normalizes with separate ops (the moments, then the affine
  transform, each in float32 and each with its gradient), which on a small
  network like ResNet-20 costs more than the convolutions: on a 2-core CPU
  the fused kernel trains ResNet-20 in bfloat16 about 1.6-2x as fast
  (BENCHMARKS.md, "Fused batch norm"). The math is Keras': batch mean and
  biased variance normalize the batch, and the moving statistics follow
  them with the layer's momentum (the kernel's variance output is
  Bessel-corrected, so it is scaled back). Only float rounding differs.

  Falls back to ``BatchNormalization``'s pass where the kernel does not
  apply: inference (the moving statistics), ``synchronized`` statistics
  (they need an all-reduce between the moments and the transform),
  float64, a mask, or anything but 4-D input normalized over its last
  axis. Its variables and their checkpoint names are
  ``BatchNormalization``'s.
  """

  def call(self, inputs, training=None, mask=None):
    if not (training and self.trainable and mask is None and
            self._fusable(inputs)):
      return super().call(inputs, training=training, mask=mask)
    outputs, mean, variance = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=tf.cast(self.gamma, tf.float32),
        offset=tf.cast(self.beta, tf.float32),
        mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
        epsilon=self.epsilon, data_format="NHWC", is_training=True)[:3]
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
    variance = variance * ((count - 1.0) / count)
    self.moving_mean.assign(self.moving_mean * self.momentum +
                            mean * (1.0 - self.momentum))
    self.moving_variance.assign(self.moving_variance * self.momentum +
                                variance * (1.0 - self.momentum))
    return tf.cast(outputs, self.compute_dtype)

  def _fusable(self, inputs) -> bool:
    return (not self.synchronized and not self.renorm and self.scale and
            self.center and len(inputs.shape) == 4 and
            self.axis in (3, -1) and
            inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))


def dropout_if_any(rate: float, *, dtype: str | None, name: str
                   ) -> ReplicaDropout | None:
  """A ``ReplicaDropout`` of ``rate``, or None for a rate of 0.

  Only when used: an unused layer would still take a seed from Keras'
  global generator and change the initialization of the layers created
  after it.
  """
  return ReplicaDropout(rate, dtype=dtype, name=name) if rate else None


def logits_dtype(dtype: str | None) -> str | None:
  """The dtype policy of a model's logits layer built under ``dtype``
  (None: the global policy): float32 under a mixed policy, so the softmax
  and the loss never see float16 overflow or underflow; else ``dtype``."""
  policy = dtype or tf.keras.config.dtype_policy().name
  return "float32" if policy.startswith("mixed") else dtype


def rng_states(model: tf.keras.Model) -> dict[str, tf.Variable]:
  """The random state of every dropout layer of ``model``.

  Args:
    model: A built model.

  Returns:
    ``dropout<i>`` (the i-th dropout layer in the model's layer order, a
    key that does not depend on generated layer names) -> its seed
    generator's state variable; empty for a model without randomness.
  """
  layers = [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, ReplicaDropout)]
  return {f"dropout{i}": layer.seed_generator.state
          for i, layer in enumerate(layers)}
