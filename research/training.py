"""What a run trains: its state, the one builder of it, and the trainer.

``build_training`` is the only place that creates a model, its optimizer and
the step functions together; the training loop, the equivalence tool, the
benchmark and the tests all use it. ``StepTrainer`` is what the controller
drives: the step functions over one run's datasets.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import tensorflow as tf

from research import layers
from research import model as model_lib
from research import optim
from research import steps as steps_lib
from research.config import ModelConfig
from research.config import OptimizerConfig
from research.config import StepConfig
from research.errors import UserError


@dataclasses.dataclass
class TrainingState:
  """What a run trains and checkpoints.

  Attributes:
    model: The model (created under the strategy's scope).
    optimizer: The optimizer, wrapped in a ``LossScaleOptimizer`` for
      mixed_float16.
    global_step: Batches consumed: the data position and the x-axis of the
      curves. It equals ``optimizer.iterations`` unless steps were skipped.
    skipped_steps: Steps whose update a non-finite loss skipped.
    checkpoint: All of the above.
    learning_rate: The optimizer's rate: a float (held in a checkpointed
      variable) or a schedule of the step.

  With an EMA of the weights (``ema_decay``), the optimizer holds the
  averages; the model holds the raw weights, which training updates, and
  holds the averages only inside ``evaluation_weights()``.
  """
  model: tf.keras.Model
  optimizer: tf.keras.optimizers.Optimizer
  global_step: tf.Variable
  skipped_steps: tf.Variable
  checkpoint: tf.train.Checkpoint
  learning_rate: float | tf.keras.optimizers.schedules.LearningRateSchedule

  @property
  def step(self) -> int:
    """The global step, as a Python int."""
    return int(self.global_step.numpy())

  @property
  def has_constant_rate(self) -> bool:
    """Whether the rate is a plain float (so a configured one can replace a
    restored one)."""
    return isinstance(self.learning_rate, float)

  @contextlib.contextmanager
  def evaluation_weights(self) -> Iterator[None]:
    """Within it, the model holds the weights that evaluation, selection and
    export use: the moving averages with an EMA (once a step has made
    them), else the trained weights. The trained weights are put back,
    bitwise, on exit. Call it between steps, not inside a step function.
    """
    averages = optim.averaged_weights(self.optimizer)
    if averages is None or not int(self.optimizer.iterations.numpy()):
      yield
      return
    variables = self.model.trainable_variables
    trained = [tf.identity(v) for v in variables]
    for variable, average in zip(variables, averages):
      variable.assign(average)
    try:
      yield
    finally:
      for variable, value in zip(variables, trained):
        variable.assign(value)


def build_training(*, strategy: tf.distribute.Strategy,
                   model_config: ModelConfig,
                   optimizer_config: OptimizerConfig,
                   step_config: StepConfig, num_classes: int,
                   image_shape: Sequence[int], total_steps: int,
                   keep_last_gradients: bool = False,
                   runner_class: type[steps_lib.StepRunner] =
                   steps_lib.StepRunner,
                   runner_args: dict[str, Any] | None = None
                   ) -> tuple[TrainingState, steps_lib.StepRunner]:
  """Creates the model, the optimizer, the step functions and the counters.

  The model and the optimizer are created under ``strategy.scope()``, and the
  optimizer is built before any step is traced. A ``float32`` run builds the
  model in the global Keras dtype policy (float32 unless a caller, such as
  the equivalence tool's float64 mode, set another).

  Args:
    strategy: The distribution strategy.
    model_config: Which registered model, with its hyper-parameters.
    optimizer_config: The optimizer and its schedule.
    step_config: How a step is computed.
    num_classes: Number of classes (the model's logits).
    image_shape: ``(H, W, C)`` of one image.
    total_steps: Steps of the whole run (the schedule's length).
    keep_last_gradients: Have the runner return each call's last gradient
      (for histograms).
    runner_class: ``StepRunner`` or a subclass (the equivalence tool's
      deliberately faulty one).
    runner_args: More keyword arguments for ``runner_class``.

  Returns:
    ``(state, runner)``: the fresh state (not restored from a checkpoint)
    and the step functions.

  Raises:
    UserError: for an unregistered model, or XLA with batch norm
      synchronized over several replicas.
    ValueError: for a schedule that does not fit ``total_steps``, or a batch
      that does not divide over the replicas.
  """
  precision = step_config.mixed_precision
  with strategy.scope():
    model = model_lib.create(
        model_config, num_classes=num_classes, image_shape=image_shape,
        dtype=None if precision == "float32" else precision)
    if (step_config.jit_compile and strategy.num_replicas_in_sync > 1 and
        model_lib.batch_norms(model, synchronized=True)):
      raise UserError(
          "--jit_compile with batch norm synchronized over several "
          "replicas is not supported here: the statistics' all-reduce "
          "would sit inside the compiled forward pass; pass "
          "--jit_compile=false, or --nosync_batch_norm")
    learning_rate = optim.make_schedule(optimizer_config,
                                        total_steps=total_steps)
    optimizer = optim.make_optimizer(optimizer_config, learning_rate,
                                     precision)
    optimizer.build(model.trainable_variables)
    # The runner all-reduces the gradients itself (their global norm and
    # clipping need the sum), so the optimizer must not sum them again.
    optim.expect_presummed_gradients(optimizer)
    runner = runner_class(
        strategy=strategy, model=model, optimizer=optimizer,
        global_batch_size=step_config.global_batch_size,
        keep_short_batch=step_config.keep_short_batch,
        jit_compile=step_config.jit_compile,
        nan_policy=step_config.nan_policy,
        label_smoothing=step_config.label_smoothing,
        clip_grad_norm=step_config.clip_grad_norm,
        keep_last_gradients=keep_last_gradients,
        test_time_augmentation=model_config.test_time_augmentation,
        **(runner_args or {}))
  # Plain (not mirrored) variables: only the host reads and writes them.
  global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                            name="global_step")
  skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                              name="skipped_steps")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   global_step=global_step,
                                   skipped_steps=skipped_steps)
  rng = layers.rng_states(model)
  if rng:
    # Keras keeps dropout's random state out of the model's weights, so
    # tf.train.Checkpoint(model=...) would not save it and a resumed run
    # would replay the first masks.
    checkpoint.rng = rng
  averages = optim.averaged_weights(optimizer)
  if averages is not None:
    # The optimizer's averages again, under a name of their own (saved
    # once): a reader restores them into a bare model's trainable variables
    # (export.load_model_from_run) without rebuilding this optimizer, whose
    # variables are numbered by construction order.
    checkpoint.averaged_weights = averages
  state = TrainingState(model, optimizer, global_step, skipped_steps,
                        checkpoint, learning_rate)
  return state, runner


class StepTrainer:
  """The controller's trainer and evaluator: the step functions over one
  run's distributed datasets."""

  def __init__(self, *, runner: steps_lib.StepRunner, state: TrainingState,
               train_dataset, eval_datasets: dict[str, tuple[Any, int]],
               eval_sets: Sequence[str], steps_per_eval_call: int = 100):
    """Args:
      runner: The step functions.
      state: The counters it advances.
      train_dataset: The distributed training dataset, from the state's
        global step on.
      eval_datasets: Each evaluation set's distributed dataset and number
        of steps, by name.
      eval_sets: The sets ``evaluate()`` evaluates by default.
      steps_per_eval_call: Evaluation steps per ``tf.function`` call.
    """
    self.runner = runner
    self.state = state
    self.eval_datasets = dict(eval_datasets)
    self.eval_sets = tuple(eval_sets)
    self.steps_per_eval_call = steps_per_eval_call
    self._iterator = iter(train_dataset)

  def train(self, num_steps: int) -> dict[str, Any]:
    """Runs ``num_steps`` training steps, waits for them, and advances the
    counters; returns ``StepRunner.train_steps``' outputs."""
    out = self.runner.train_steps(self._iterator,
                                  tf.constant(num_steps, tf.int32))
    out["step_losses"].numpy()  # Waits for the steps to finish.
    self.state.global_step.assign_add(num_steps)
    self.state.skipped_steps.assign_add(int(out["skipped"]))
    return out

  def evaluate(self, sets: Sequence[str] | None = None
               ) -> dict[str, dict[str, Any]]:
    """``StepRunner.evaluate`` over each set (default: ``eval_sets``).

    Returns:
      Set name -> its result.
    """
    results = {}
    with self.state.evaluation_weights():
      for name in self.eval_sets if sets is None else sets:
        dataset, num_steps = self.eval_datasets[name]
        results[name] = self.runner.evaluate(
            dataset, num_steps, steps_per_call=self.steps_per_eval_call)
    return results
