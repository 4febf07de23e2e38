"""The outer training loop: epochs, evaluation, checkpoints, logging.

``train`` builds everything under the strategy's scope, restores the latest
checkpoint, and runs the remaining steps in calls of ``steps_per_loop`` steps,
cut short at epoch, evaluation and checkpoint boundaries. The global step is
``optimizer.iterations``; a resumed run trains only what is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import tensorflow as tf

from research import data as data_lib
from research import distribute
from research import model as model_lib
from research import steps as steps_lib
from research.checkpoints import CheckpointKeeper
from research.summaries import SummaryManager


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run.

  Attributes:
    model_dir: Run directory: event files, checkpoints, metrics.json.
    epochs: Passes over the training set.
    global_batch_size: Examples per step over all replicas.
    learning_rate: Adam's learning rate.
    seed: Seed of initialization, data order and augmentation.
    steps_per_loop: Training steps per ``tf.function`` call.
    eval_every_steps: Also evaluate every this many steps (0: epochs only).
    checkpoint_every_steps: Save every this many steps (0: only at the end).
    keep_checkpoints: Newest checkpoints to keep.
    augment: Random crop and flip on training images.
    keep_short_batch: Keep each epoch's last short batch.
    jit_compile: Compile the steps with XLA.
    l2: Kernel L2 regularization factor.
  """
  model_dir: str
  epochs: int = 10
  global_batch_size: int = 32
  learning_rate: float = 0.001
  seed: int = 0
  steps_per_loop: int = 100
  eval_every_steps: int = 0
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3
  augment: bool = False
  keep_short_batch: bool = False
  jit_compile: bool = False
  l2: float = 0.0

  def __post_init__(self):
    for name in ("epochs", "global_batch_size", "steps_per_loop",
                 "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every_steps", "checkpoint_every_steps", "l2"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically: a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy,
          data: data_lib.ArrayData, log: Callable[[str], None] = print
          ) -> dict:
  """Trains (or resumes training of) a ConvNet and evaluates it.

  Args:
    config: The run's settings.
    strategy: The distribution strategy (created before any other op).
    data: The dataset, in memory.
    log: Receives one console line per loop and per evaluation.

  Returns:
    The final metrics (also written to ``<model_dir>/metrics.json`` by the
    chief): ``eval_accuracy``, ``eval_loss``, ``global_step``, ``epochs``,
    ``wall_seconds``, ``train_examples_per_second``.

  Raises:
    ValueError: if the global batch size does not divide by the replicas.
    UserError: if the model directory holds an incompatible checkpoint.
  """
  start_time = time.time()
  chief = distribute.is_chief(strategy)
  spe = data_lib.steps_per_epoch(len(data.train_labels),
                                 config.global_batch_size,
                                 not config.keep_short_batch)
  total_steps = config.epochs * spe
  num_eval_steps = data_lib.eval_steps(len(data.test_labels),
                                       config.global_batch_size)

  tf.keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = model_lib.build(
        model_lib.ConvNet(num_classes=data.num_classes, l2=config.l2),
        data.image_shape)
    optimizer = tf.keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(model.trainable_variables)
    runner = steps_lib.StepRunner(
        strategy=strategy, model=model, optimizer=optimizer,
        global_batch_size=config.global_batch_size,
        keep_short_batch=config.keep_short_batch,
        jit_compile=config.jit_compile)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
  keeper = CheckpointKeeper(
      checkpoint=checkpoint,
      directory=os.path.join(config.model_dir, "checkpoints"),
      max_to_keep=config.keep_checkpoints, is_chief=chief)
  restored = keeper.restore_latest()
  step = int(optimizer.iterations.numpy())
  if restored:
    log(f"resumed from {restored} at step {step}/{total_steps}")

  summaries = SummaryManager(model_dir=config.model_dir, enabled=chief)
  train_dataset = strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_train_dataset(
          data, global_batch_size=config.global_batch_size, seed=config.seed,
          num_epochs=config.epochs, start_step=step,
          drop_remainder=not config.keep_short_batch, augment=config.augment,
          input_context=ctx))
  eval_dataset = strategy.distribute_datasets_from_function(
      lambda ctx: data_lib.make_eval_dataset(
          data, global_batch_size=config.global_batch_size, input_context=ctx))
  iterator = iter(train_dataset)

  def evaluate(at_step, write_summary=True):
    t0 = time.time()
    result = runner.evaluate(eval_dataset, num_eval_steps,
                             steps_per_call=config.steps_per_loop)
    if write_summary:
      summaries.scalars("eval", {"loss": result["loss"],
                                 "accuracy": result["accuracy"]}, at_step)
    log(f"eval  step {at_step}/{total_steps} epoch {at_step / spe:.2f} "
        f"loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
        f"({result['correct']}/{result['count']}) "
        f"{time.time() - t0:.1f}s")
    return result

  def boundary_after(s, every):
    return (s // every + 1) * every if every else total_steps

  train_seconds, train_examples, calls = 0.0, 0, 0
  last_eval = None
  while step < total_steps:
    n = min(config.steps_per_loop, total_steps - step,
            boundary_after(step, spe) - step,
            boundary_after(step, config.eval_every_steps) - step,
            boundary_after(step, config.checkpoint_every_steps) - step)
    t0 = time.time()
    out = runner.train_steps(iterator, tf.constant(n, tf.int32))
    losses = out["step_losses"].numpy()
    seconds = time.time() - t0
    count = int(out["count"])
    step += n
    calls += 1
    # The first call includes tracing; leave it out of the mean rate.
    if calls > 1 or step >= total_steps:
      train_seconds += seconds
      train_examples += count
    examples_per_second = count / max(seconds, 1e-9)
    recent_rate = (train_examples / train_seconds if train_seconds
                   else examples_per_second)
    eta = (total_steps - step) * config.global_batch_size / max(recent_rate,
                                                                1e-9)
    loss = float(losses.mean())
    accuracy = int(out["correct"]) / max(count, 1)
    lr = float(tf.convert_to_tensor(optimizer.learning_rate))
    summaries.scalars("train", {"loss": loss, "accuracy": accuracy,
                                "learning_rate": lr,
                                "examples_per_second": examples_per_second},
                      step)
    log(f"train step {step}/{total_steps} epoch {step / spe:.2f} "
        f"loss {loss:.4f} accuracy {accuracy:.4f} "
        f"{examples_per_second:,.0f} ex/s ETA {_format_duration(eta)}")

    if step % spe == 0 or (config.eval_every_steps and
                           step % config.eval_every_steps == 0):
      last_eval = (step, evaluate(step))
    if step == total_steps or (config.checkpoint_every_steps and
                               step % config.checkpoint_every_steps == 0):
      keeper.save(step)
      summaries.commit()
    elif not config.checkpoint_every_steps:
      summaries.commit()

  if last_eval is None:
    # Only reached when the restored run was already complete: its final
    # evaluation is in the event files, so don't record it twice.
    last_eval = (step, evaluate(step, write_summary=False))
  summaries.close()
  result = last_eval[1]
  metrics = {
      "eval_accuracy": result["accuracy"],
      "eval_loss": result["loss"],
      "eval_correct": result["correct"],
      "eval_count": result["count"],
      "global_step": step,
      "epochs": config.epochs,
      "steps_per_epoch": spe,
      "wall_seconds": time.time() - start_time,
      "train_examples_per_second": (train_examples / train_seconds
                                    if train_seconds else None),
      "num_replicas": strategy.num_replicas_in_sync,
  }
  if chief:
    _write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
  return metrics
