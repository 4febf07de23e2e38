"""The outer training loop: epochs, evaluation, checkpoints, logging.

``train`` builds everything under the strategy's scope, restores the latest
checkpoint, and runs the remaining steps in calls of ``steps_per_loop`` steps,
cut short at epoch, evaluation and checkpoint boundaries. The global step is
the number of batches consumed (``optimizer.iterations`` unless steps were
skipped for a non-finite loss); a resumed run trains only what is left.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import tensorflow as tf

from research import data as data_lib
from research import distribute
from research import export as export_lib
from research import model as model_lib
from research import optim
from research import preemption
from research import run_record as run_record_lib
from research import steps as steps_lib
from research.checkpoints import CheckpointKeeper
from research.errors import UserError
from research.files import write_json
from research.options import OPTIMIZERS
from research.options import PRECISIONS
from research.profiling import StepProfiler
from research.reporting import TrainReporter
from research.reporting import hparams_of
from research.summaries import SummaryManager


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run.

  Attributes:
    model_dir: Run directory: event files, checkpoints, metrics.json.
    epochs: Passes over the training set.
    global_batch_size: Examples per step over all replicas.
    learning_rate: Base (peak) learning rate. With a constant schedule the
      configured value wins over a restored one.
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
    optimizer: ``adam``, ``adamw`` or ``sgd`` (see ``optim.make_optimizer``).
    weight_decay: Decoupled weight decay (0: none).
    momentum: SGD momentum.
    nesterov: SGD with Nesterov momentum.
    lr_schedule: ``constant``, ``cosine``, ``step`` or ``exponential`` (see
      ``optim``), over the run's total steps.
    warmup_steps: Linear warmup steps.
    lr_decay_rate: ``step``/``exponential`` decay factor.
    lr_decay_steps: Steps per ``lr_decay_rate`` (0: see ``optim``).
    label_smoothing: Smoothing of the training targets.
    clip_grad_norm: Clip the global gradient to this L2 norm (0: off).
    histogram_every_steps: Weight and gradient histograms period (0: off).
    eval_images: Test images shown with predictions after each evaluation.
    profile_steps: ``(first, last)`` global steps to trace, or None.
    export: Write a serving SavedModel to ``<model_dir>/export`` at the end.
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
  optimizer: str = "adam"
  weight_decay: float = 0.0
  momentum: float = 0.9
  nesterov: bool = False
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  lr_decay_rate: float = 0.1
  lr_decay_steps: int = 0
  label_smoothing: float = 0.0
  clip_grad_norm: float = 0.0
  histogram_every_steps: int = 0
  eval_images: int = 24
  profile_steps: tuple[int, int] | None = None
  export: bool = True

  def __post_init__(self):
    for name in ("epochs", "global_batch_size", "steps_per_loop",
                 "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every_steps", "checkpoint_every_steps", "l2",
                 "weight_decay", "warmup_steps", "lr_decay_steps",
                 "clip_grad_norm", "histogram_every_steps", "eval_images"):
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
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got "
                       f"{self.optimizer!r}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got "
                       f"{self.label_smoothing}")
    if self.deterministic and self.jit_compile:
      raise ValueError("deterministic and jit_compile cannot both be on: "
                       "TensorFlow has no deterministic XLA MaxPool gradient")


class NonFiniteLossError(UserError):
  """Training met a non-finite loss or gradient under ``nan_policy=stop``."""

  exit_status = 3


@dataclasses.dataclass
class TrainingState:
  """What a run trains and checkpoints.

  Attributes:
    model: The ConvNet (under the strategy's scope).
    optimizer: The optimizer, wrapped in a ``LossScaleOptimizer`` for
      mixed_float16.
    runner: The step functions.
    global_step: Batches consumed: the data position and the x-axis of the
      curves. It equals ``optimizer.iterations`` unless steps were skipped.
    skipped_steps: Steps whose update a non-finite loss skipped.
    checkpoint: All of the above that is state.
    learning_rate: The optimizer's rate: a float (held in a checkpointed
      variable) or a schedule of the step.
  """
  model: tf.keras.Model
  optimizer: tf.keras.optimizers.Optimizer
  runner: steps_lib.StepRunner
  global_step: tf.Variable
  skipped_steps: tf.Variable
  checkpoint: tf.train.Checkpoint
  learning_rate: float | tf.keras.optimizers.schedules.LearningRateSchedule


def build_training_state(config: TrainConfig, *,
                         strategy: tf.distribute.Strategy,
                         data: data_lib.ArrayData,
                         total_steps: int) -> TrainingState:
  """Creates the model, optimizer, step functions and counters.

  The model and optimizer are created under ``strategy.scope()`` and the
  optimizer is built before any step is traced.

  Args:
    config: The run's settings.
    strategy: The distribution strategy.
    data: The dataset (for the image shape and number of classes).
    total_steps: Steps of the whole run (the schedule's length).

  Returns:
    The fresh state (not yet restored from a checkpoint).
  """
  with strategy.scope():
    model = model_lib.build(
        model_lib.ConvNet(num_classes=data.num_classes, l2=config.l2,
                          dtype=config.mixed_precision),
        data.image_shape)
    learning_rate = optim.make_schedule(
        config.lr_schedule, base_learning_rate=config.learning_rate,
        total_steps=total_steps, warmup_steps=config.warmup_steps,
        decay_rate=config.lr_decay_rate, decay_steps=config.lr_decay_steps)
    optimizer = optim.make_optimizer(
        learning_rate, config.mixed_precision, name=config.optimizer,
        weight_decay=config.weight_decay, momentum=config.momentum,
        nesterov=config.nesterov)
    optimizer.build(model.trainable_variables)
    runner = steps_lib.StepRunner(
        strategy=strategy, model=model, optimizer=optimizer,
        global_batch_size=config.global_batch_size,
        keep_short_batch=config.keep_short_batch,
        jit_compile=config.jit_compile, nan_policy=config.nan_policy,
        label_smoothing=config.label_smoothing,
        clip_grad_norm=config.clip_grad_norm,
        keep_last_gradients=config.histogram_every_steps > 0)
  # Plain (not mirrored) variables: only the host reads and writes them.
  global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                            name="global_step")
  skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                              name="skipped_steps")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   global_step=global_step,
                                   skipped_steps=skipped_steps)
  return TrainingState(model, optimizer, runner, global_step, skipped_steps,
                       checkpoint, learning_rate)


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy,
          data: data_lib.ArrayData, log: Callable[[str], None] = print,
          run_files: dict[str, dict] | None = None,
          run_record: dict | None = None) -> dict:
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
      ``{"flags.json": {...}}``. ``model.json`` (what ``export.py`` needs to
      rebuild the model) is always written.
    run_record: This invocation's record (``run_record.collect``), appended
      to ``<model_dir>/run_record.json`` by the chief at the same point.

  Returns:
    The final metrics (also written to ``<model_dir>/metrics.json`` by the
    chief): ``eval_accuracy``, ``eval_loss``, ``global_step``, ``epochs``,
    ``wall_seconds``, ``train_examples_per_second``, ``skipped_steps``,
    ``export_dir`` (None if not exported).

  Raises:
    ValueError: if the global batch size does not divide by the replicas.
    UserError: if the model directory holds an incompatible checkpoint, or
      the export cannot be written.
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

  if config.warmup_steps >= total_steps:
    raise UserError(f"--warmup_steps={config.warmup_steps} must be less than "
                    f"the run's {total_steps} steps")
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  tf.keras.utils.set_random_seed(config.seed)
  state = build_training_state(config, strategy=strategy, data=data,
                               total_steps=total_steps)
  optimizer, runner = state.optimizer, state.runner
  global_step, skipped_steps = state.global_step, state.skipped_steps
  keeper = CheckpointKeeper(
      checkpoint=state.checkpoint,
      directory=os.path.join(config.model_dir, "checkpoints"),
      max_to_keep=config.keep_checkpoints, is_chief=chief)
  restored = keeper.restore_latest()
  if isinstance(state.learning_rate, float):
    # A plain rate lives in a checkpointed variable; the flag wins.
    optimizer.learning_rate = config.learning_rate
  step = int(global_step.numpy())
  if restored:
    log(f"resumed from {restored} at step {step}/{total_steps}")
  if chief:
    os.makedirs(config.model_dir, exist_ok=True)
    files = dict(run_files or {})
    files[export_lib.MODEL_SPEC_FILE] = export_lib.model_spec(
        class_names=data.class_names, image_shape=data.image_shape,
        l2=config.l2)
    for name, payload in files.items():
      write_json(os.path.join(config.model_dir, name), payload)
    if run_record is not None:
      run_record_lib.append(config.model_dir, run_record)

  summaries = SummaryManager(model_dir=config.model_dir, enabled=chief)
  summaries.hparams(hparams_of(config),
                    trial_id=os.path.basename(os.path.abspath(
                        config.model_dir)))
  reporter = TrainReporter(
      summaries=summaries, log=log, model=state.model,
      total_steps=total_steps, steps_per_epoch=spe,
      global_batch_size=config.global_batch_size,
      class_names=data.class_names,
      histogram_every_steps=config.histogram_every_steps,
      log_skipped_steps=config.nan_policy == "skip")
  profiler = StepProfiler(logdir=config.model_dir,
                          steps=config.profile_steps, enabled=chief)
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
  sample = (data.test_images[:config.eval_images],
            data.test_labels[:config.eval_images])

  def evaluate(at_step):
    t0 = time.time()
    result = runner.evaluate(eval_dataset, num_eval_steps,
                             steps_per_call=config.steps_per_loop)
    reporter.evaluation(step=at_step, result=result,
                        seconds=time.time() - t0, sample_images=sample)
    return result

  def boundary_after(s, every):
    return (s // every + 1) * every if every else total_steps

  watcher = preemption.PreemptionWatcher(strategy)
  try:
    last_eval = None
    while step < total_steps:
      n = min(config.steps_per_loop, total_steps - step,
              boundary_after(step, spe) - step,
              boundary_after(step, config.eval_every_steps) - step,
              boundary_after(step, config.checkpoint_every_steps) - step,
              (profiler.next_boundary(step) or total_steps) - step)
      profiler.before_call(step)
      t0 = time.time()
      out = runner.train_steps(iterator, tf.constant(n, tf.int32))
      out["step_losses"].numpy()  # Waits for the steps to finish.
      seconds = time.time() - t0
      bad_step = int(out["nonfinite_step"])
      if bad_step >= 0 and config.nan_policy == "stop":
        profiler.stop()
        last = keeper.manager.latest_checkpoint if chief else None
        raise NonFiniteLossError(
            f"loss or gradient is not finite at step {step + bad_step + 1}; "
            f"training stopped without saving (the last good checkpoint is "
            f"{last or 'none'}); lower --learning_rate, check the data, or "
            f"pass --nan_policy=skip")
      step += n
      profiler.after_call(step)
      global_step.assign(step)
      skipped_steps.assign_add(int(out["skipped"]))
      reporter.train_loop(step=step, num_steps=n, out=out, seconds=seconds,
                          skipped_total=int(skipped_steps.numpy()))

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
    export_dir = None
    if config.export and chief:
      export_dir = export_lib.export_saved_model(
          state.model, os.path.join(config.model_dir,
                                    export_lib.EXPORT_SUBDIR),
          class_names=data.class_names, image_shape=data.image_shape)
      log(f"exported a SavedModel to {export_dir}")
    result = last_eval[1]
    metrics = {
        "eval_accuracy": result["accuracy"],
        "eval_loss": result["loss"],
        "eval_correct": result["correct"],
        "eval_count": result["count"],
        "eval_class_accuracy": dict(zip(
            data.class_names, [float(a) for a in result["class_accuracy"]])),
        "global_step": step,
        "optimizer_steps": int(optimizer.iterations.numpy()),
        "skipped_steps": int(skipped_steps.numpy()),
        "epochs": config.epochs,
        "steps_per_epoch": spe,
        "wall_seconds": time.time() - start_time,
        "train_examples_per_second": reporter.examples_per_second,
        "num_replicas": strategy.num_replicas_in_sync,
        "export_dir": export_dir,
    }
    if chief:
      write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    return metrics
  finally:
    profiler.stop()
    watcher.close()
