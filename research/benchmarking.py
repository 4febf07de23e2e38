"""Throughput measurement: the loop against ``model.fit``, side by side.

Contenders run in one process and are timed in alternating windows after a
warm-up window each, in an order that rotates every round, so drift on a
shared machine hits all of them alike; each contender's result is the median
of its windows.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from research import data as data_lib
from research import model as model_lib
from research import optim
from research.config import ModelConfig
from research.config import OptimizerConfig
from research.config import StepConfig
from research.training import build_training


def training_flops_per_example(model: tf.keras.Model, image_shape) -> int:
  """FLOPs (a multiply-add counts 2) to train on one example.

  Forward, plus the weight gradient and the input gradient of every
  convolution and matmul (the ``Conv2D`` and ``MatMul`` ops of the traced
  inference pass, so any registered model counts the same way); the first
  of them has no input gradient (nothing needs it). Batch norm, pooling,
  activations, additions and the optimizer update are not counted.

  Args:
    model: A built model.
    image_shape: Shape of one image.

  Returns:
    The count.
  """
  graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
      tf.TensorSpec((1,) + tuple(image_shape), tf.float32)).graph
  total, first = 0, True
  for op in graph.get_operations():
    if op.type == "Conv2D":
      kernel = op.inputs[1].shape
      forward = 2 * int(np.prod(op.outputs[0].shape[1:3])) * int(
          np.prod(kernel))
    elif op.type == "MatMul":
      forward = 2 * int(np.prod(op.inputs[1].shape))
    else:
      continue
    total += forward * (2 if first else 3)
    first = False
  return total


def matmul_gflops(size: int = 4096, repeats: int = 5,
                  dtype: tf.DType = tf.float32) -> float:
  """Median GFLOP/s of a ``size``² matmul in ``dtype``: the machine's
  ceiling for that precision (bfloat16 for ``mixed_bfloat16`` rows, whose
  convolutions and matmuls run in bfloat16)."""
  a = tf.cast(tf.random.stateless_normal((size, size), seed=[1, 2]), dtype)
  b = tf.cast(tf.random.stateless_normal((size, size), seed=[3, 4]), dtype)
  matmul = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))
  matmul(a, b).numpy()  # warm-up
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, b).numpy()
    rates.append(2 * size ** 3 / (time.perf_counter() - t0) / 1e9)
  return statistics.median(rates)


class LoopContender:
  """Our loop: ``StepRunner.train_steps`` over a given dataset."""

  def __init__(self, dataset: tf.data.Dataset, *, global_batch_size: int,
               steps_per_loop: int, jit_compile: bool, seed: int = 0,
               precision: str = "float32",
               model_config: ModelConfig = ModelConfig(),
               image_shape: tuple[int, int, int] = model_lib.IMAGE_SHAPE,
               num_classes: int = model_lib.NUM_CLASSES):
    """Builds the model and its step under the current strategy.

    Args:
      dataset: Batches of ``(images, labels)``, at least as many as will run.
      global_batch_size: Its batch size.
      steps_per_loop: Steps per call of the compiled loop.
      jit_compile: Whether the step is compiled with XLA.
      seed: Seeds the initial weights.
      precision: A Keras dtype policy name.
      model_config: The model.
      image_shape: One image's shape in ``dataset``.
      num_classes: The classes of its labels.
    """
    self.strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(seed)
    _, self.runner = build_training(
        strategy=self.strategy, model_config=model_config,
        optimizer_config=OptimizerConfig(),
        step_config=StepConfig(global_batch_size=global_batch_size,
                               jit_compile=jit_compile,
                               mixed_precision=precision),
        num_classes=num_classes, image_shape=image_shape, total_steps=1)
    self.iterator = iter(dataset)
    self.steps_per_loop = steps_per_loop

  def run(self, steps: int) -> None:
    """Trains ``steps`` steps (and waits for them)."""
    done = 0
    while done < steps:
      n = min(self.steps_per_loop, steps - done)
      self.runner.train_steps(self.iterator, tf.constant(n))["count"].numpy()
      done += n


class FitContender:
  """``model.fit`` on the model's Sequential twin (the seed's model for the
  ConvNet) or a second instance (``model.create_fit_twin``)."""

  def __init__(self, dataset: tf.data.Dataset, *, steps_per_execution: int,
               jit_compile, seed: int = 0, precision: str = "float32",
               model_config: ModelConfig = ModelConfig(),
               image_shape: tuple[int, int, int] = model_lib.IMAGE_SHAPE,
               num_classes: int = model_lib.NUM_CLASSES):
    """Builds and compiles the model.

    Args:
      dataset: Batches of ``(images, labels)``, at least as many as will run.
      steps_per_execution: ``compile``'s steps per call.
      jit_compile: ``compile``'s (True, False or "auto").
      seed: Seeds the initial weights.
      precision: A Keras dtype policy name.
      model_config: The model.
      image_shape: One image's shape in ``dataset``.
      num_classes: The classes of its labels.
    """
    tf.keras.utils.set_random_seed(seed)
    self.model = model_lib.create_fit_twin(
        model_config, num_classes=num_classes, image_shape=image_shape,
        dtype=None if precision == "float32" else precision)
    self.model.compile(
        optimizer=optim.make_optimizer(OptimizerConfig(), 0.001, precision),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    self.dataset = dataset
    self.steps_per_execution = steps_per_execution

  def run(self, steps: int) -> None:
    """Trains about ``steps`` steps: a whole number of executions."""
    steps = max(self.steps_per_execution,
                steps // self.steps_per_execution * self.steps_per_execution)
    self.model.fit(self.dataset, steps_per_epoch=steps, epochs=1, verbose=0,
                   shuffle=False)


def synthetic_in_memory(global_batch_size: int, seed: int = 0, *,
                        image_shape: tuple[int, int, int] = (32, 32, 3),
                        num_classes: int = 10) -> tf.data.Dataset:
  """One constant batch, repeated: the input-free ceiling."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (global_batch_size, *image_shape)
                       ).astype(np.float32)
  labels = rng.integers(0, num_classes, global_batch_size).astype(np.int32)
  return tf.data.Dataset.from_tensors((images, labels)).repeat()


def real_pipeline(data: data_lib.ArrayData, global_batch_size: int,
                  seed: int = 0) -> tf.data.Dataset:
  """The training pipeline, repeated for as long as the benchmark needs."""
  return data_lib.make_train_dataset(data, global_batch_size=global_batch_size,
                                     seed=seed, num_epochs=1000)


def time_alternating(contenders: dict[str, Callable[[int], None]], *,
                     steps: int, windows: int) -> dict[str, list[float]]:
  """Seconds per window of ``steps`` steps, for each contender.

  Each contender runs one untimed warm-up window (tracing, compilation).
  Then the timed windows are interleaved, and the order rotates every round
  (A B C, B C A, C A B, ...) so that no contender always follows the same
  one. Garbage is collected before every window, outside the timing, so one
  contender's leftovers (``fit``'s iterators) are not charged to the next.
  """
  for run in contenders.values():
    run(steps)
  names = list(contenders)
  seconds = {name: [] for name in names}
  for round_index in range(windows):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      gc.collect()
      t0 = time.perf_counter()
      contenders[name](steps)
      seconds[name].append(time.perf_counter() - t0)
  return seconds
