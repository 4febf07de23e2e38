"""The models, and the registry that ``--model=NAME`` picks from.

``ConvNet`` is the CIFAR-10 network of the seed document, subclassed.
``build_sequential`` builds the seed's own ``tf.keras.Sequential`` form with
the same layers in the same order (plus the ``Flatten`` the seed forgot), so
``model.fit`` can be run on the very same weights (see ``copy_weights``).

Every model returns logits; pair it with ``from_logits=True`` losses.

Adding a model is one function and one registration line::

    def mlp(config, *, num_classes, image_shape, dtype):
      return MyMLP(num_classes, dtype=dtype)

    register_model("mlp", mlp)

The loop, the steps, the export and the equivalence tool then take it by name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import tensorflow as tf

from research import resnet
from research.config import ModelConfig
from research import layers
from research.layers import rng_states
from research.registry import Registry

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def _layer_stack(num_classes: int, l2: float, dtype: str | None,
                 dropout: float = 0.0) -> list[tf.keras.layers.Layer]:
  """The seed's layers, in order, shared by both model forms (with
  ``dropout``, a dropout layer before each dense layer)."""
  reg = tf.keras.regularizers.L2(l2) if l2 else None
  def conv(filters, name):
    return tf.keras.layers.Conv2D(
        filters, (3, 3), activation="relu", kernel_regularizer=reg, name=name,
        dtype=dtype)

  def dense(units, activation, name, layer_dtype=dtype):
    return tf.keras.layers.Dense(
        units, activation=activation, kernel_regularizer=reg, name=name,
        dtype=layer_dtype)

  def drop(name):
    layer = layers.dropout_if_any(dropout, dtype=dtype, name=name)
    return [layer] if layer else []

  return [
      conv(32, "conv1"),
      tf.keras.layers.MaxPooling2D((2, 2), name="pool1", dtype=dtype),
      conv(64, "conv2"),
      tf.keras.layers.MaxPooling2D((2, 2), name="pool2", dtype=dtype),
      conv(64, "conv3"),
      # The seed omits this; without it the Dense layers would act on every
      # position of the 4x4x64 map instead of on one feature vector.
      tf.keras.layers.Flatten(name="flatten", dtype=dtype),
      *drop("dropout1"),
      dense(64, "relu", "dense1"),
      *drop("dropout2"),
      # Logits: softmax lives in the loss (from_logits=True), which is
      # numerically safer and what mixed precision needs.
      dense(num_classes, None, "logits", layers.logits_dtype(dtype)),
  ]


class ConvNet(tf.keras.Model):
  """Conv32-Pool-Conv64-Pool-Conv64-Flatten-Dense64-Dense(num_classes).

  For 32x32x3 inputs and 10 classes it has 122,570 parameters.
  """

  def __init__(self, *, num_classes: int = NUM_CLASSES, l2: float = 0.0,
               dropout: float = 0.0, dtype: str | None = None,
               name: str = "convnet"):
    """Creates the layers.

    Args:
      num_classes: Number of output logits; must be >= 2.
      l2: Kernel L2 regularization factor for every conv and dense layer; 0
        disables it. The penalties appear in ``model.losses``.
      dropout: Dropout rate before each dense layer (0: no dropout layers);
        each replica draws its own masks (``layers.ReplicaDropout``).
      dtype: Keras dtype policy of the layers, e.g. ``mixed_float16`` (the
        logits layer stays float32 under a mixed policy); None: the global
        policy.
      name: Keras model name.

    Raises:
      ValueError: if ``num_classes`` < 2, ``l2`` < 0 or ``dropout`` is
        outside [0, 1).
    """
    if num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if l2 < 0:
      raise ValueError(f"l2 must be >= 0, got {l2}")
    super().__init__(name=name, dtype=dtype)
    self.num_classes = num_classes
    stack = _layer_stack(num_classes, l2, dtype, dropout)
    # One attribute per layer (not a list): TensorFlow's checkpoint graph
    # follows attributes, so the weights save under model/conv1/... and a
    # model can be restored on its own, without its optimizer.
    for layer in stack:
      setattr(self, layer.name, layer)
    self._layer_names = tuple(layer.name for layer in stack)

  @property
  def stack(self) -> list[tf.keras.layers.Layer]:
    """The layers, input to output."""
    return [getattr(self, name) for name in self._layer_names]

  def call(self, images, training=False):
    x = images
    for layer in self.stack:
      x = layer(x, training=training)
    return x


def build_sequential(*, num_classes: int = NUM_CLASSES, l2: float = 0.0,
                     dropout: float = 0.0, input_shape=IMAGE_SHAPE,
                     dtype: str | None = None) -> tf.keras.Sequential:
  """Builds the seed's ``Sequential`` form of ``ConvNet`` (for ``model.fit``).

  Args:
    num_classes: Number of output logits.
    l2: Kernel L2 regularization factor, as in ``ConvNet``.
    dropout: Dropout rate, as in ``ConvNet``.
    input_shape: Shape of one image.
    dtype: Keras dtype policy, as in ``ConvNet``.

  Returns:
    A built ``tf.keras.Sequential`` whose weights line up one-to-one with a
    built ``ConvNet``'s.
  """
  model = tf.keras.Sequential(
      [tf.keras.Input(shape=input_shape)] + _layer_stack(num_classes, l2,
                                                         dtype, dropout),
      name="seed_sequential")
  return model


def build(model: tf.keras.Model, input_shape=IMAGE_SHAPE) -> tf.keras.Model:
  """Creates a model's variables by calling it once on a zero batch.

  Args:
    model: The model to build.
    input_shape: Shape of one image.

  Returns:
    The same model, built.
  """
  model(tf.zeros((1,) + tuple(input_shape)), training=False)
  return model


def inference_logits(model: tf.keras.Model, images, *,
                     flip_average: bool = False, shift_average: int = 0,
                     dtype: tf.DType = tf.float32) -> tf.Tensor:
  """The logits every evaluation and the export use.

  The model runs in inference mode (``training=False``: batch norm on its
  moving statistics, dropout off). Test-time augmentation averages the
  logits over views of each image: with ``shift_average`` the image and its
  four translations by that many pixels (up, down, left, right; the pixels
  moved in are zero, as in the training crops' padding), with
  ``flip_average`` each of those and its left-right mirror. All views go
  through the model as one batch.

  Args:
    model: A model returning logits.
    images: Float model input ``[N, H, W, C]``.
    flip_average: Average over each image and its mirror.
    shift_average: Translation in pixels of the four shifted views (0:
      none).
    dtype: The logits' type (the mean is taken in it, not in a bfloat16 or
      float16 compute type).

  Returns:
    ``[N, classes]`` logits of type ``dtype``.
  """
  views = [images]
  if shift_average:
    views += [_translated(images, rows, columns, shift_average)
              for rows, columns in ((-1, 0), (1, 0), (0, -1), (0, 1))]
  if flip_average:
    views += [tf.reverse(view, axis=[2]) for view in views]
  if len(views) == 1:
    return tf.cast(model(images, training=False), dtype)
  logits = tf.cast(model(tf.concat(views, 0), training=False), dtype)
  return tf.add_n(tf.split(logits, len(views))) / len(views)


def _translated(images, rows: int, columns: int, pixels: int) -> tf.Tensor:
  """``images`` moved by ``pixels`` times ``(rows, columns)`` (down and
  right for positive values), zero where nothing moved in."""
  padded = tf.pad(images, [[0, 0], [pixels, pixels], [pixels, pixels],
                           [0, 0]])
  return tf.slice(padded, [0, pixels - rows * pixels,
                           pixels - columns * pixels, 0], tf.shape(images))


def state_variables(model: tf.keras.Model) -> list[tf.Variable]:
  """Everything that decides what ``model`` computes next: its weights
  (trainable, then batch norm's moving statistics) and its dropout layers'
  random states (which Keras keeps out of ``weights``)."""
  return model.weights + list(rng_states(model).values())


def batch_norms(model: tf.keras.Model, *, synchronized: bool
                ) -> list[tf.keras.layers.BatchNormalization]:
  """The model's batch-norm layers that all-reduce their statistics over
  the replicas (``synchronized``), or those that do not."""
  return [layer for layer in model._flatten_layers(include_self=False)
          if isinstance(layer, tf.keras.layers.BatchNormalization) and
          layer.synchronized == synchronized]


def copy_weights(source: tf.keras.Model, target: tf.keras.Model) -> None:
  """Copies every weight of ``source`` into ``target`` (either form), and the
  random state of its dropout layers, so both draw the same masks next.

  Args:
    source: A built registered model or its ``Sequential`` twin.
    target: A built model of the other (or the same) form.

  Raises:
    ValueError: if the two models' weights or dropout layers differ in
      count or shape.
  """
  src, dst = state_variables(source), state_variables(target)
  if len(src) != len(dst):
    raise ValueError(
        f"cannot copy weights: source has {len(src)} weights and random "
        f"states, target has {len(dst)}")
  for s, d in zip(src, dst):
    if tuple(s.shape) != tuple(d.shape):
      raise ValueError(
          f"cannot copy weights: {s.path} has shape {tuple(s.shape)} but "
          f"{d.path} has shape {tuple(d.shape)}")
    d.assign(s)


def resolve_sync_batch_norm(config: ModelConfig, num_replicas: int) -> bool:
  """Whether batch norm all-reduces its statistics: ``config``'s choice, or
  by default exactly when there is more than one replica (on one device
  the global batch is the local one)."""
  if config.sync_batch_norm is None:
    return num_replicas > 1
  return config.sync_batch_norm


# ---------------------------------------------------------------------------
# The registry.

# (config, *, num_classes, image_shape, dtype) -> an unbuilt Keras model.
ModelFactory = Callable[..., tf.keras.Model]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered model.

  Attributes:
    create: ``(config, *, num_classes, image_shape, dtype)`` -> a Keras model
      returning logits; ``dtype`` is a Keras dtype policy name or None (the
      global policy).
    sequential: The same network as a ``tf.keras.Sequential`` (same
      arguments, built), whose weights line up with ``create``'s; the
      equivalence tool trains it with ``fit``. None: ``fit`` trains a second
      instance of ``create``'s model.
  """
  create: ModelFactory
  sequential: ModelFactory | None = None


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, create: ModelFactory, *,
                   sequential: ModelFactory | None = None) -> None:
  """Makes ``--model=name`` build ``create(config, ...)`` (see ``ModelEntry``).

  Raises:
    ValueError: if the name is taken or malformed.
  """
  MODELS.register(name, ModelEntry(create, sequential))


def create(config: ModelConfig, *, num_classes: int,
           image_shape: Sequence[int], dtype: str | None = None
           ) -> tf.keras.Model:
  """Creates and builds the registered model ``config.name``.

  Args:
    config: The model's name and hyper-parameters.
    num_classes: Number of output logits.
    image_shape: ``(H, W, C)`` of one image.
    dtype: Keras dtype policy name; None: the global policy.

  Returns:
    The built model (its variables exist).

  Raises:
    UserError: if no model of that name is registered.
  """
  entry = MODELS.get(config.name)
  return build(entry.create(config, num_classes=num_classes,
                            image_shape=tuple(image_shape), dtype=dtype),
               image_shape)


def create_fit_twin(config: ModelConfig, *, num_classes: int,
                    image_shape: Sequence[int], dtype: str | None = None
                    ) -> tf.keras.Model:
  """The model ``model.fit`` trains in comparisons with the loop: the
  registered ``Sequential`` twin (built), or else a second instance of the
  registered model itself. Arguments as for ``create``."""
  entry = MODELS.get(config.name)
  if entry.sequential is None:
    return create(config, num_classes=num_classes, image_shape=image_shape,
                  dtype=dtype)
  return entry.sequential(config, num_classes=num_classes,
                          image_shape=tuple(image_shape), dtype=dtype)


def _convnet(config: ModelConfig, *, num_classes: int, image_shape, dtype):
  del image_shape  # Any size works; the dense layer sizes itself.
  return ConvNet(num_classes=num_classes, l2=config.l2,
                 dropout=config.dropout, dtype=dtype)


def _convnet_sequential(config: ModelConfig, *, num_classes: int, image_shape,
                        dtype):
  return build_sequential(num_classes=num_classes, l2=config.l2,
                          dropout=config.dropout, input_shape=image_shape,
                          dtype=dtype)


def _resnet(config: ModelConfig, *, num_classes: int, image_shape, dtype):
  del image_shape  # Any size works: global average pooling.
  # Created under the run's strategy scope: its replica count decides.
  replicas = tf.distribute.get_strategy().num_replicas_in_sync
  return resnet.ResNet(
      config.resnet_depth, num_classes=num_classes, l2=config.l2,
      dropout=config.dropout,
      sync_batch_norm=resolve_sync_batch_norm(config, replicas),
      fused_batch_norm=config.fused_batch_norm, dtype=dtype)


register_model("convnet", _convnet, sequential=_convnet_sequential)
register_model("resnet", _resnet)
