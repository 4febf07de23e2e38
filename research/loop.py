"""The outer training loop: epochs, evaluation, checkpoints, logging.

``train`` builds everything under the strategy's scope, restores the latest
checkpoint, and runs the remaining steps in calls of ``steps_per_loop`` steps,
cut short at epoch, evaluation and checkpoint boundaries. The global step is
the number of batches consumed (``optimizer.iterations`` unless steps were
skipped for a non-finite loss); a resumed run trains only what is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from research import data as data_lib
from research import distribute
from research import model as model_lib
from research import preemption
from research import steps as steps_lib
from research.checkpoints import CheckpointKeeper
from research.errors import UserError
from research.options import PRECISIONS
from research.summaries import SummaryManager


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run.

  Attributes:
    model_dir: Run directory: event files, checkpoints, metrics.json.
    epochs: Passes over the training set.
    global_batch_size: Examples per step over all replicas.
    learning_rate: Adam's learning rate (the configured value wins over a
      restored one).
    seed: Seed of initialization, data order and augmentation.
    steps_per_loop: Training steps per ``tf.function`` call.
    eval_every_steps: Also evaluate every this many steps (0: epochs only).
    checkpoint_every_steps: Save every this many steps (0: only at the end).
    keep_checkpoints: Newest checkpoints to keep.
    augment: Random crop and flip on training images.
    keep_short_batch: Keep each epoch's last short batch.
    jit_compile: Compile the steps with XLA.
    l2: Kernel L2 regularization factor.
    deterministic: Enable op determinism, so that two runs of the same
      configuration give bitwise-identical weights.
    nan_policy: ``stop`` or ``skip`` a step whose loss or gradient is not
      finite (see ``steps.StepRunner``).
    mixed_precision: Keras dtype policy: ``float32``, ``mixed_float16``
      (with a ``LossScaleOptimizer``) or ``mixed_bfloat16``.
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
  deterministic: bool = False
  nan_policy: str = "stop"
  mixed_precision: str = "float32"

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
    if self.nan_policy not in steps_lib.NAN_POLICIES:
      raise ValueError(f"nan_policy must be one of {steps_lib.NAN_POLICIES}, "
                       f"got {self.nan_policy!r}")
    if self.mixed_precision not in PRECISIONS:
      raise ValueError(f"mixed_precision must be one of "
                       f"{PRECISIONS}, got {self.mixed_precision!r}")
    if self.deterministic and self.jit_compile:
      raise ValueError("deterministic and jit_compile cannot both be on: "
                       "TensorFlow has no deterministic XLA MaxPool gradient")


class NonFiniteLossError(UserError):
  """Training met a non-finite loss or gradient under ``nan_policy=stop``."""

  exit_status = 3


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically: a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)


@dataclasses.dataclass
class TrainingState:
  """What a run trains and checkpoints.

  Attributes:
    model: The ConvNet (under the strategy's scope).
    optimizer: Adam, wrapped in a ``LossScaleOptimizer`` for mixed_float16.
    runner: The step functions.
    global_step: Batches consumed: the data position and the x-axis of the
      curves. It equals ``optimizer.iterations`` unless steps were skipped.
    skipped_steps: Steps whose update a non-finite loss skipped.
    checkpoint: All of the above that is state.
  """
  model: tf.keras.Model
  optimizer: tf.keras.optimizers.Optimizer
  runner: steps_lib.StepRunner
  global_step: tf.Variable
  skipped_steps: tf.Variable
  checkpoint: tf.train.Checkpoint


def build_training_state(config: TrainConfig, *,
                         strategy: tf.distribute.Strategy,
                         data: data_lib.ArrayData) -> TrainingState:
  """Creates the model, optimizer, step functions and counters.

  The model and optimizer are created under ``strategy.scope()`` and the
  optimizer is built before any step is traced.

  Args:
    config: The run's settings.
    strategy: The distribution strategy.
    data: The dataset (for the image shape and number of classes).

  Returns:
    The fresh state (not yet restored from a checkpoint).
  """
  with strategy.scope():
    model = model_lib.build(
        model_lib.ConvNet(num_classes=data.num_classes, l2=config.l2,
                          dtype=config.mixed_precision),
        data.image_shape)
    optimizer = steps_lib.make_optimizer(config.learning_rate,
                                         config.mixed_precision)
    optimizer.build(model.trainable_variables)
    runner = steps_lib.StepRunner(
        strategy=strategy, model=model, optimizer=optimizer,
        global_batch_size=config.global_batch_size,
        keep_short_batch=config.keep_short_batch,
        jit_compile=config.jit_compile, nan_policy=config.nan_policy)
  # Plain (not mirrored) variables: only the host reads and writes them.
  global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                            name="global_step")
  skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                              name="skipped_steps")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   global_step=global_step,
                                   skipped_steps=skipped_steps)
  return TrainingState(model, optimizer, runner, global_step, skipped_steps,
                       checkpoint)


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy,
          data: data_lib.ArrayData, log: Callable[[str], None] = print,
          run_files: dict[str, dict] | None = None) -> dict:
  """Trains (or resumes training of) a ConvNet and evaluates it.

  Order of durable writes at a checkpoint: summaries first, then the
  checkpoint. A run killed at any point resumes from its latest checkpoint,
  re-creates the exact input it would have seen (see ``data``), and skips
  summaries that the event files already hold, so the curves show every step
  once.

  Args:
    config: The run's settings.
    strategy: The distribution strategy (created before any other op).
    data: The dataset, in memory.
    log: Receives one console line per loop and per evaluation.
    run_files: JSON files to write into ``model_dir`` (chief only) once the
      run is known to be startable (after the checkpoint check), e.g.
      ``{"flags.json": {...}}``.

  Returns:
    The final metrics (also written to ``<model_dir>/metrics.json`` by the
    chief): ``eval_accuracy``, ``eval_loss``, ``global_step``, ``epochs``,
    ``wall_seconds``, ``train_examples_per_second``, ``skipped_steps``.

  Raises:
    ValueError: if the global batch size does not divide by the replicas.
    UserError: if the model directory holds an incompatible checkpoint.
    NonFiniteLossError: on a non-finite loss or gradient with
      ``nan_policy="stop"``; nothing is saved.
    preemption.Preempted: after a SIGTERM, once the checkpoint of the
      current step is saved.
  """
  start_time = time.time()
  chief = distribute.is_chief(strategy)
  spe = data_lib.steps_per_epoch(len(data.train_labels),
                                 config.global_batch_size,
                                 not config.keep_short_batch)
  total_steps = config.epochs * spe
  num_eval_steps = data_lib.eval_steps(len(data.test_labels),
                                       config.global_batch_size)

  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  tf.keras.utils.set_random_seed(config.seed)
  state = build_training_state(config, strategy=strategy, data=data)
  optimizer, runner = state.optimizer, state.runner
  global_step, skipped_steps = state.global_step, state.skipped_steps
  checkpoint = state.checkpoint
  keeper = CheckpointKeeper(
      checkpoint=checkpoint,
      directory=os.path.join(config.model_dir, "checkpoints"),
      max_to_keep=config.keep_checkpoints, is_chief=chief)
  restored = keeper.restore_latest()
  optimizer.learning_rate = config.learning_rate
  step = int(global_step.numpy())
  if restored:
    log(f"resumed from {restored} at step {step}/{total_steps}")
  if chief:
    for name, payload in (run_files or {}).items():
      write_json(os.path.join(config.model_dir, name), payload)

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

  def evaluate(at_step):
    t0 = time.time()
    result = runner.evaluate(eval_dataset, num_eval_steps,
                             steps_per_call=config.steps_per_loop)
    summaries.scalars("eval", {"loss": result["loss"],
                               "accuracy": result["accuracy"]}, at_step)
    log(f"eval  step {at_step}/{total_steps} epoch {at_step / spe:.2f} "
        f"loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
        f"({result['correct']}/{result['count']}) "
        f"{time.time() - t0:.1f}s")
    return result

  def boundary_after(s, every):
    return (s // every + 1) * every if every else total_steps

  watcher = preemption.PreemptionWatcher(strategy)
  try:
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
      bad_step = int(out["nonfinite_step"])
      if bad_step >= 0 and config.nan_policy == "stop":
        last = keeper.manager.latest_checkpoint if chief else None
        raise NonFiniteLossError(
            f"loss or gradient is not finite at step {step + bad_step + 1}; "
            f"training stopped without saving (the last good checkpoint is "
            f"{last or 'none'}); lower --learning_rate, check the data, or "
            f"pass --nan_policy=skip")
      count = int(out["count"])
      step += n
      global_step.assign(step)
      skipped_steps.assign_add(int(out["skipped"]))
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
      finite = losses[np.isfinite(losses)]
      loss = float(finite.mean()) if len(finite) else float("nan")
      accuracy = int(out["correct"]) / max(count, 1)
      lr = float(tf.convert_to_tensor(optimizer.learning_rate))
      train_scalars = {"loss": loss, "accuracy": accuracy, "learning_rate": lr,
                       "examples_per_second": examples_per_second}
      if config.nan_policy == "skip":
        train_scalars["skipped_steps"] = int(skipped_steps.numpy())
      summaries.scalars("train", train_scalars, step)
      skipped_note = (f" skipped {int(skipped_steps.numpy())}"
                      if int(skipped_steps.numpy()) else "")
      log(f"train step {step}/{total_steps} epoch {step / spe:.2f} "
          f"loss {loss:.4f} accuracy {accuracy:.4f} "
          f"{examples_per_second:,.0f} ex/s ETA {_format_duration(eta)}"
          f"{skipped_note}")

      if step % spe == 0 or (config.eval_every_steps and
                             step % config.eval_every_steps == 0):
        last_eval = (step, evaluate(step))
      if step == total_steps or (config.checkpoint_every_steps and
                                 step % config.checkpoint_every_steps == 0):
        summaries.commit()
        keeper.save(step)
      elif not config.checkpoint_every_steps:
        summaries.commit()
      if step < total_steps and watcher.should_stop():
        summaries.commit()
        path = keeper.save(step)
        summaries.close()
        log(f"stopped by SIGTERM at step {step}/{total_steps}; checkpoint "
            f"saved; run the same command to resume")
        raise preemption.Preempted(step, path)

    if last_eval is None:
      # Only reached when the restored run was already complete; its final
      # evaluation is in the event files (and is not written twice).
      last_eval = (step, evaluate(step))
    summaries.close()
    result = last_eval[1]
    metrics = {
        "eval_accuracy": result["accuracy"],
        "eval_loss": result["loss"],
        "eval_correct": result["correct"],
        "eval_count": result["count"],
        "global_step": step,
        "optimizer_steps": int(optimizer.iterations.numpy()),
        "skipped_steps": int(skipped_steps.numpy()),
        "epochs": config.epochs,
        "steps_per_epoch": spe,
        "wall_seconds": time.time() - start_time,
        "train_examples_per_second": (train_examples / train_seconds
                                      if train_seconds else None),
        "num_replicas": strategy.num_replicas_in_sync,
    }
    if chief:
      write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    return metrics
  finally:
    watcher.close()
