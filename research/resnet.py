"""ResNets for CIFAR (He et al. 2016, "Deep Residual Learning", section 4.2).

``depth = 6n + 2``: a 3x3 convolution with 16 filters, then three stages of
``n`` basic blocks (two 3x3 convolutions each) with 16, 32 and 64 filters, the
second and third starting with stride 2, then global average pooling and the
classifier. Batch normalization follows every convolution. Shortcuts are the
paper's option A (the one its CIFAR results use): identity, and where the
shape changes, the input subsampled by the stride with its channels
zero-padded, so shortcuts add no parameters. ResNet-20 then has 269,722
trainable parameters for 10 classes (the paper's "0.27M") and 1,376 moving
batch-norm statistics.
"""

from __future__ import annotations

import tensorflow as tf

from research import layers
from research import options

STAGE_FILTERS = (16, 32, 64)
# Reference implementations' batch norm (PyTorch's defaults): moving averages
# that follow the weights within a few hundred steps of a short schedule.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def blocks_per_stage(depth: int) -> int:
  """``n`` of ``depth = 6n + 2``.

  Raises:
    ValueError: if ``depth`` is not ``6n + 2`` with ``n >= 1``.
  """
  if not options.is_resnet_depth(depth):
    raise ValueError(f"resnet depth must be {options.RESNET_DEPTH_RULE}, "
                     f"got {depth}")
  return (depth - 2) // 6


class _ConvBN(tf.keras.layers.Layer):
  """3x3 convolution (no bias: batch norm's beta is the bias) + batch norm."""

  def __init__(self, filters, strides, *, regularizer, synchronized, fused,
               dtype, name):
    super().__init__(dtype=dtype, name=name)
    self.conv = tf.keras.layers.Conv2D(
        filters, 3, strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", kernel_regularizer=regularizer,
        dtype=dtype, name="conv")
    batch_norm = (layers.FusedBatchNormalization if fused else
                  layers.BatchNormalization)
    self.bn = batch_norm(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=synchronized,
        dtype=dtype, name="bn")

  def call(self, x, training=False):
    return self.bn(self.conv(x), training=training)


class BasicBlock(tf.keras.layers.Layer):
  """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), option A shortcut."""

  def __init__(self, filters, strides, *, regularizer, synchronized, fused,
               dtype, name):
    super().__init__(dtype=dtype, name=name)
    self.filters = filters
    self.strides = strides
    kwargs = dict(regularizer=regularizer, synchronized=synchronized,
                  fused=fused, dtype=dtype)
    self.first = _ConvBN(filters, strides, name="first", **kwargs)
    self.second = _ConvBN(filters, 1, name="second", **kwargs)

  def call(self, x, training=False):
    y = tf.nn.relu(self.first(x, training=training))
    y = self.second(y, training=training)
    shortcut = x
    if self.strides != 1:
      shortcut = shortcut[:, ::self.strides, ::self.strides, :]
    missing = self.filters - shortcut.shape[-1]
    if missing:
      shortcut = tf.pad(shortcut, [[0, 0], [0, 0], [0, 0],
                                   [missing // 2, missing - missing // 2]])
    return tf.nn.relu(y + shortcut)


class ResNet(tf.keras.Model):
  """A CIFAR ResNet of ``depth = 6n + 2`` layers (see the module doc)."""

  def __init__(self, depth: int = 20, *, num_classes: int = 10,
               l2: float = 0.0, dropout: float = 0.0,
               sync_batch_norm: bool = False, fused_batch_norm: bool = False,
               dtype: str | None = None, name: str | None = None):
    """Creates the layers.

    Args:
      depth: ``6n + 2`` (20, 32, 44, 56, 110 in the paper).
      num_classes: Number of output logits; >= 2.
      l2: Kernel L2 regularization factor of every convolution and the
        classifier (0: off).
      dropout: Dropout rate before the classifier (0: no dropout layer);
        each replica draws its own masks (``layers.ReplicaDropout``).
      sync_batch_norm: Batch statistics over the global batch (all
        replicas, one all-reduce a layer: ``layers.BatchNormalization``)
        instead of each replica's share of it.
      fused_batch_norm: Batch norm trains on TensorFlow's fused kernel
        where it is not synchronized (``layers.FusedBatchNormalization``).
      dtype: Keras dtype policy; under a mixed policy the classifier stays
        float32 (batch norm computes in float32 under any policy).
      name: Keras model name (default ``resnet<depth>``).

    Raises:
      ValueError: for a depth that is not 6n + 2, num_classes < 2, l2 < 0,
        or dropout outside [0, 1).
    """
    n = blocks_per_stage(depth)
    if num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if l2 < 0:
      raise ValueError(f"l2 must be >= 0, got {l2}")
    super().__init__(dtype=dtype, name=name or f"resnet{depth}")
    self.depth = depth
    regularizer = tf.keras.regularizers.L2(l2) if l2 else None
    kwargs = dict(regularizer=regularizer, synchronized=sync_batch_norm,
                  fused=fused_batch_norm, dtype=dtype)
    self.stem = _ConvBN(STAGE_FILTERS[0], 1, name="stem", **kwargs)
    blocks = [
        BasicBlock(filters, 2 if stage and not i else 1,
                   name=f"stage{stage + 1}_block{i + 1}", **kwargs)
        for stage, filters in enumerate(STAGE_FILTERS) for i in range(n)]
    # One attribute per block, not a list: TensorFlow's checkpoint graph
    # follows attributes only, and would save none of a list's variables
    # (model/stage1_block1/first/conv/kernel, ...).
    for block in blocks:
      setattr(self, block.name, block)
    self._block_names = tuple(block.name for block in blocks)
    self.pool = tf.keras.layers.GlobalAveragePooling2D(dtype=dtype,
                                                       name="pool")
    self.dropout = layers.dropout_if_any(dropout, dtype=dtype,
                                         name="dropout")
    self.logits = tf.keras.layers.Dense(
        num_classes, kernel_regularizer=regularizer,
        dtype=layers.logits_dtype(dtype), name="logits")

  @property
  def blocks(self) -> list[BasicBlock]:
    """The residual blocks, input to output."""
    return [getattr(self, name) for name in self._block_names]

  def call(self, images, training=False):
    x = tf.nn.relu(self.stem(images, training=training))
    for block in self.blocks:
      x = block(x, training=training)
    x = self.pool(x)
    if self.dropout is not None:
      x = self.dropout(x, training=training)
    return self.logits(x)
