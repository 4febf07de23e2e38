"""Layers the registered models share: dropout that is right under a strategy.

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
