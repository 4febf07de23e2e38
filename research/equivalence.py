"""Proof that the custom loop equals ``model.fit``, step by step.

Both sides start from the same initial weights (the registered model's are
copied into its ``Sequential`` twin, such as the seed's form of the
``ConvNet``, or into a second instance of the model), use the same optimizer
settings and loss, the same ``tf.data`` pipeline (same seed, order and
batches), the same ``jit_compile``, and run with op determinism on. Then every step's loss, every
weight after training, and the evaluation on the test split are compared.

``model.fit`` only logs a running mean of the loss over the epoch. A callback
resets the metrics before each batch, so the logged value after the batch is
that batch's own loss; ``fit_loss_recovery_error`` checks this against the
loss of the first batch computed directly from the initial weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from research import data as data_lib
from research import distribute
from research import model as model_lib
from research import optim
from research import steps as steps_lib
from research.config import ModelConfig
from research.config import OptimizerConfig
from research.config import StepConfig
from research.errors import UserError
from research.layers import rng_states
from research.options import FAULTS
from research.options import PRECISIONS
from research.training import build_training


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Largest allowed differences between the loop and ``fit``."""
  loss: float
  weight: float
  eval_loss: float = 1e-6


# The thresholds of each mode (see README.md, "Equivalence with model.fit").
TOLERANCES = {
    "one_device": Tolerance(loss=1e-6, weight=0.0),
    "loop_replicas_vs_fit_one_device": Tolerance(loss=1e-5, weight=1e-4),
    "same_strategy": Tolerance(loss=1e-6, weight=1e-6),
}


# Why the mode that changes the replica count compares in float64 by default:
# changing the replica count changes the order in which gradients are summed,
# so float32 results differ in the last bit after the first step. Adam's first
# updates are nearly sign(gradient) * learning_rate, and training amplifies
# such differences chaotically: in float32, Keras' own fit on 2 replicas
# differs from fit on 1 device by 1.3e-3 in the weights after 10 CIFAR-10
# steps and 0.10 after 200, as does fit against itself with one initial weight
# moved by one ulp. In float64 the same amplification leaves differences far
# below the tolerances, while a real mistake (a loss not scaled for the
# replicas) still shows at once.
DTYPES = ("float64",) + PRECISIONS


def default_dtype(replicas: int, fit_replicas: int) -> str:
  """float64 when the replica counts differ (see the comment above)."""
  return "float64" if replicas != fit_replicas else "float32"


def mode_of(replicas: int, fit_replicas: int) -> str:
  """Names the comparison mode of a (loop, fit) replica-count pair."""
  if replicas == fit_replicas:
    return "one_device" if replicas == 1 else "same_strategy"
  return "loop_replicas_vs_fit_one_device"


@dataclasses.dataclass(frozen=True)
class EquivalenceConfig:
  """What to compare.

  Attributes:
    global_batch_size: Examples per step.
    steps: Training steps (None: one epoch).
    replicas: Replicas of the loop's strategy.
    fit_replicas: Replicas of ``fit``'s strategy (1: no strategy).
    model: The registered model on both sides (``fit`` trains its
      Sequential twin, or a second instance, from the same weights).
    optimizer: The optimizer and schedule on both sides; the schedule runs
      over ``steps``.
    keep_short_batch: Keep each epoch's last short batch.
    steps_per_loop: The loop's steps per ``tf.function`` call.
    jit_compile: XLA on both sides.
    seed: Seed of initialization and data order.
    dtype: ``float32``; ``float64`` for both models and losses (see
      ``default_dtype``); or a mixed policy, ``mixed_float16`` (both sides
      with a ``LossScaleOptimizer``: ``compile`` adds one by itself) or
      ``mixed_bfloat16``.
    noise_floor: Also measure what float rounding alone does: one-device
      ``fit`` against itself with one initial weight moved by one ulp.
    fault: A deliberate bug in the loop (to show the check can fail).
    fault_step: First step at which the fault acts.
  """
  global_batch_size: int = 32
  steps: int | None = None
  replicas: int = 1
  fit_replicas: int = 1
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  keep_short_batch: bool = False
  steps_per_loop: int = 50
  jit_compile: bool = False
  seed: int = 0
  dtype: str = "float32"
  noise_floor: bool = False
  fault: str = "none"
  fault_step: int = 0

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.fault not in FAULTS:
      raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")
    for name in ("global_batch_size", "replicas", "fit_replicas",
                 "steps_per_loop"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclasses.dataclass
class Report:
  """Everything the comparison measured."""
  mode: str
  tolerance: Tolerance
  steps: int
  fit_losses: list[float]
  loop_losses: list[float]
  max_loss_diff: float
  worst_step: int
  first_failing_step: int | None
  max_weight_diff: float
  worst_weight: str
  fit_loss_recovery_error: float | None
  # Variables compared: {"trainable": n, "non_trainable": n (batch norm's
  # moving statistics), "random_states": n (dropout's)}.
  compared: dict
  noise_floor_loss: float | None
  noise_floor_weight: float | None
  dtype: str
  fit_eval: dict
  loop_eval: dict
  passed: bool
  failures: list[str]

  def to_json(self) -> dict:
    """The whole report as JSON-ready values (``--json_out``)."""
    out = dataclasses.asdict(self)
    out["tolerance"] = dataclasses.asdict(self.tolerance)
    return out


class _FaultyStepRunner(steps_lib.StepRunner):
  """The loop with one deliberate mistake, from ``fault_step`` on."""

  def __init__(self, *, fault: str, fault_step: int, **kwargs):
    super().__init__(**kwargs)
    self.fault = fault
    self.fault_step = fault_step

  def replica_loss(self, labels, logits, global_batch_size):
    right = super().replica_loss(labels, logits, global_batch_size)
    if self.fault == "unscaled_loss":
      # Averages over the replica's own batch, forgetting the other replicas.
      wrong = tf.reduce_mean(self.loss_fn(labels, logits))
      if self.model.losses:
        wrong += tf.nn.scale_regularization_loss(self._regularization())
    else:  # unscaled_regularization: the penalty counted once per replica.
      wrong = tf.nn.compute_average_loss(self.loss_fn(labels, logits),
                                         global_batch_size=global_batch_size)
      if self.model.losses:
        wrong += self._regularization()
    active = self.optimizer.iterations >= self.fault_step
    return tf.where(active, wrong, right)


def _strategy(devices: Sequence[str]) -> tf.distribute.Strategy:
  if len(devices) == 1:
    return tf.distribute.OneDeviceStrategy(devices[0])
  return distribute.mirrored_strategy(devices)


class _PerBatchLoss(tf.keras.callbacks.Callback):
  """Records each batch's own loss from ``fit``'s logs.

  Resetting the metrics before every batch turns the running mean that
  ``fit`` logs into the loss of that batch alone.
  """

  def __init__(self):
    super().__init__()
    self.losses = []

  def on_train_batch_begin(self, batch, logs=None):
    for metric in self.model.metrics:
      metric.reset_state()

  def on_train_batch_end(self, batch, logs=None):
    self.losses.append(float(logs["loss"]))


@contextlib.contextmanager
def _keras_dtype(dtype: str):
  """Within the block, Keras builds layers, losses and metrics in ``dtype``.

  Both the policy (layers) and floatx (losses, metrics such as fit's loss
  tracker) are set, so a float64 comparison has no float32 step anywhere.
  """
  previous_policy = tf.keras.config.dtype_policy()
  previous_floatx = tf.keras.config.floatx()
  tf.keras.config.set_dtype_policy(dtype)
  if not dtype.startswith("mixed"):  # Mixed policies keep float32 variables.
    tf.keras.config.set_floatx(dtype)
  try:
    yield
  finally:
    tf.keras.config.set_dtype_policy(previous_policy)
    tf.keras.config.set_floatx(previous_floatx)


def _fit_optimizer(config: EquivalenceConfig, steps: int):
  """``fit``'s optimizer: the loop's settings, a fresh instance (``compile``
  adds the LossScaleOptimizer of mixed_float16 by itself)."""
  return optim.make_optimizer(
      config.optimizer,
      optim.make_schedule(config.optimizer, total_steps=steps), "float32")


def _run_loop(config, data, strategy, initial_weights, train_dataset,
              eval_dataset, steps):
  """Trains with our loop; returns (losses, model, eval result)."""
  step_config = StepConfig(
      global_batch_size=config.global_batch_size,
      keep_short_batch=config.keep_short_batch,
      # float64 is no mixed policy: it comes from the caller's Keras dtype.
      mixed_precision=config.dtype if config.dtype in PRECISIONS
      else "float32",
      jit_compile=config.jit_compile)
  faulty = config.fault != "none"
  state, runner = build_training(
      strategy=strategy, model_config=config.model,
      optimizer_config=config.optimizer, step_config=step_config,
      num_classes=data.num_classes, image_shape=data.image_shape,
      total_steps=steps,
      runner_class=_FaultyStepRunner if faulty else steps_lib.StepRunner,
      runner_args={"fault": config.fault, "fault_step": config.fault_step}
      if faulty else None)
  for w, value in zip(model_lib.state_variables(state.model),
                      initial_weights):
    w.assign(value)
  in_pipeline = not distribute.preprocesses_on_device(strategy)
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda context: train_dataset(context, in_pipeline)))
  losses = []
  while len(losses) < steps:
    n = min(config.steps_per_loop, steps - len(losses))
    losses += runner.train_steps(
        iterator, tf.constant(n))["step_losses"].numpy().tolist()
  evaluation = runner.evaluate(
      strategy.distribute_datasets_from_function(
          lambda context: eval_dataset(
              context, preprocess_in_pipeline=in_pipeline)),
      data_lib.eval_steps(len(data.test_labels), config.global_batch_size))
  return losses, state.model, evaluation


def _run_fit(config, data, strategy, initial_weights, train_dataset,
             eval_dataset, steps, *, perturb=False):
  """Trains with ``model.fit``; returns (losses, model, eval result,
  recovery error of the per-batch loss)."""
  with strategy.scope():
    seq = model_lib.create_fit_twin(config.model,
                                    num_classes=data.num_classes,
                                    image_shape=data.image_shape)
    for w, value in zip(model_lib.state_variables(seq), initial_weights):
      w.assign(value)
    if perturb:  # One ulp on one weight: the smallest possible difference.
      first = seq.weights[0].numpy()
      first.flat[0] = np.nextafter(first.flat[0], first.dtype.type(np.inf))
      seq.weights[0].assign(first)
    seq.compile(
        # compile wraps it in a LossScaleOptimizer itself for float16.
        optimizer=_fit_optimizer(config, steps),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=config.jit_compile,
        steps_per_execution=1)
  direct_first_loss = None
  if strategy.num_replicas_in_sync == 1 or not _depends_on_replicas(seq):
    # fit's first step, computed here from the same state: in training mode
    # (batch statistics, the same dropout masks), then the state put back.
    first_x, first_y = next(iter(train_dataset()))
    state = model_lib.state_variables(seq)
    before = [v.numpy() for v in state]
    # Compiled as fit's step is: XLA draws other dropout masks.
    first_logits = tf.function(lambda x: seq(x, training=True),
                               jit_compile=config.jit_compile)(first_x)
    direct_first_loss = float(
        tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            first_y, first_logits, from_logits=True))
        + (tf.add_n(seq.losses) if seq.losses else 0.0))
    for v, value in zip(state, before):
      v.assign(value)
  recorder = _PerBatchLoss()
  seq.fit(train_dataset(), epochs=1, steps_per_epoch=steps, verbose=0,
          callbacks=[recorder], shuffle=False)
  evaluated = seq.evaluate(eval_dataset(padded=False), verbose=0,
                           return_dict=True)
  num_test = len(data.test_labels)
  evaluation = {"loss": float(evaluated["loss"]),
                "accuracy": float(evaluated["accuracy"]),
                "correct": int(round(float(evaluated["accuracy"]) * num_test)),
                "count": num_test}
  recovery_error = (None if direct_first_loss is None else
                    abs(recorder.losses[0] - direct_first_loss))
  return recorder.losses, seq, evaluation, recovery_error


def _max_weight_diff(a: tf.keras.Model, b: tf.keras.Model) -> tuple[float, str]:
  # Every trainable and non-trainable weight (batch norm's moving
  # statistics), and the dropout layers' random states.
  return max((float(np.max(np.abs(x.numpy() - y.numpy()))), y.path)
             for x, y in zip(model_lib.state_variables(a),
                             model_lib.state_variables(b)))


def _depends_on_replicas(model: tf.keras.Model) -> bool:
  """Whether a training step's math depends on how the batch is split over
  replicas: dropout (each replica its own masks) or batch norm on each
  replica's share."""
  return bool(rng_states(model) or
              model_lib.batch_norms(model, synchronized=False))


def run(config: EquivalenceConfig, data: data_lib.ArrayData,
        devices: Sequence[str]) -> Report:
  """Trains with the loop and with ``fit`` and compares them.

  Call ``tf.config.experimental.enable_op_determinism()`` first.

  Args:
    config: What to compare.
    data: The dataset.
    devices: Devices to place replicas on (at least
      ``max(replicas, fit_replicas)``).

  Returns:
    The report.

  Raises:
    ValueError: if there are too few devices, or the batch does not divide
      over the replicas.
  """
  with _keras_dtype(config.dtype), _no_graph_rewrites():
    return _run(config, data, devices)


@contextlib.contextmanager
def _no_graph_rewrites():
  """Within the block, functions run without Grappler's graph rewrites (its
  meta-optimizer off).

  Grappler rewrites each graph on its own: its arithmetic optimizer, for
  one, turned the gradients that meet at a ResNet's shortcuts into other
  trees of additions in ``fit``'s graph than in the loop's, so the two
  rounded differently from the first rewritten sum on. The comparison is of
  the math both sides ask for (as with oneDNN's rewrites, which the
  verifier turns off too); and the rewrites' own time goes (a tenth to a
  fifth of the tests' batch of 2- and 4-replica cases, tracing included).
  """
  previous = tf.config.optimizer.get_experimental_options().get(
      "disable_meta_optimizer", False)
  tf.config.optimizer.set_experimental_options(
      {"disable_meta_optimizer": True})
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": previous})


def _run(config: EquivalenceConfig, data: data_lib.ArrayData,
         devices: Sequence[str]) -> Report:
  need = max(config.replicas, config.fit_replicas)
  if len(devices) < need:
    raise ValueError(f"need {need} devices, got {len(devices)}: {devices}")
  for r in (config.replicas, config.fit_replicas):
    if config.global_batch_size % r:
      raise ValueError(f"global_batch_size {config.global_batch_size} does "
                       f"not divide over {r} replicas")
  if config.model.dropout and config.replicas != config.fit_replicas:
    raise UserError(
        f"--dropout cannot be compared across a change of replica count "
        f"(loop {config.replicas}, fit {config.fit_replicas}): each replica "
        f"draws its masks from the shared seed with its replica id folded "
        f"in, so another replica count drops other units and no step can "
        f"agree. Compare dropout under the same strategy (--fit_replicas="
        f"{config.replicas}, or both on one device); across replica counts "
        f"compare --dropout=0")
  # Both sides with the batch norm the loop's replica count resolves to.
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, sync_batch_norm=model_lib.resolve_sync_batch_norm(
          config.model, config.replicas)))
  drop = not config.keep_short_batch
  epoch_steps = data_lib.steps_per_epoch(len(data.train_labels),
                                         config.global_batch_size, drop)
  steps = config.steps or epoch_steps
  epochs = -(-steps // epoch_steps)

  # fit's pipelines preprocess; the loop's leave it to the step where the
  # trainer's would (distribute.preprocesses_on_device).
  def train_dataset(input_context=None, preprocess_in_pipeline=True):
    return data_lib.make_train_dataset(
        data, global_batch_size=config.global_batch_size, seed=config.seed,
        num_epochs=epochs, drop_remainder=drop, input_context=input_context,
        preprocess_in_pipeline=preprocess_in_pipeline)

  def eval_dataset(input_context=None, padded=True,
                   preprocess_in_pipeline=True):
    return data_lib.make_eval_dataset(
        data, global_batch_size=config.global_batch_size,
        input_context=input_context, padded=padded,
        preprocess_in_pipeline=preprocess_in_pipeline)

  tf.keras.utils.set_random_seed(config.seed)
  initial_weights = [w.numpy() for w in model_lib.state_variables(
      model_lib.create(config.model, num_classes=data.num_classes,
                       image_shape=data.image_shape))]
  datasets = (train_dataset, eval_dataset, steps)
  loop_losses, net, loop_eval = _run_loop(
      config, data, _strategy(devices[:config.replicas]), initial_weights,
      *datasets)
  fit_strategy = (_strategy(devices[:config.fit_replicas])
                  if config.fit_replicas > 1 else tf.distribute.get_strategy())
  fit_losses, seq, fit_eval, recovery_error = _run_fit(
      config, data, fit_strategy, initial_weights, *datasets)
  noise_loss = noise_weight = None
  if config.noise_floor:
    noisy_losses, noisy, _, _ = _run_fit(
        config, data, tf.distribute.get_strategy(), initial_weights,
        *datasets, perturb=True)
    noise_loss = float(np.max(np.abs(np.array(noisy_losses) -
                                     np.array(fit_losses))))
    noise_weight = _max_weight_diff(noisy, seq)[0]

  # Compare.
  mode = mode_of(config.replicas, config.fit_replicas)
  tolerance = TOLERANCES[mode]
  diffs = np.abs(np.array(fit_losses, np.float64) -
                 np.array(loop_losses, np.float64))
  over = np.nonzero(diffs > tolerance.loss)[0]
  max_weight_diff, worst_weight = _max_weight_diff(seq, net)
  num_test = len(data.test_labels)

  failures = []
  if len(fit_losses) != steps:
    failures.append(f"fit ran {len(fit_losses)} steps, expected {steps}")
  if len(over):
    failures.append(
        f"step {int(over[0])}: |loss difference| {diffs[over[0]]:.3g} > "
        f"{tolerance.loss:g} (first of {len(over)} steps over tolerance)")
  if max_weight_diff > tolerance.weight:
    failures.append(f"weights: max |difference| {max_weight_diff:.3g} in "
                    f"{worst_weight} > {tolerance.weight:g}")
  if recovery_error is not None and recovery_error > 1e-6:
    failures.append(f"fit's per-batch loss recovery is off by "
                    f"{recovery_error:.3g}")
  if loop_eval["correct"] != fit_eval["correct"] or (
      loop_eval["count"] != num_test):
    failures.append(
        f"eval: loop has {loop_eval['correct']}/{loop_eval['count']} "
        f"correct, model.evaluate {fit_eval['correct']}/{num_test}")
  if abs(loop_eval["loss"] - fit_eval["loss"]) > tolerance.eval_loss:
    failures.append(f"eval loss: loop {loop_eval['loss']:.8f} vs "
                    f"model.evaluate {fit_eval['loss']:.8f}")

  if failures and mode == "loop_replicas_vs_fit_one_device" and (
      model_lib.batch_norms(net, synchronized=False)):
    failures.append(
        "expected: with --nosync_batch_norm each of the loop's replicas "
        "normalizes by the statistics of its own share of the batch, fit on "
        "one device by those of the whole batch, so they compute different "
        "functions; --sync_batch_norm makes them equal")
  return Report(
      mode=mode, tolerance=tolerance, steps=steps, fit_losses=fit_losses,
      loop_losses=loop_losses, max_loss_diff=float(diffs.max()),
      worst_step=int(np.argmax(diffs)),
      first_failing_step=int(over[0]) if len(over) else None,
      max_weight_diff=max_weight_diff, worst_weight=worst_weight,
      fit_loss_recovery_error=recovery_error,
      compared={"trainable": len(net.trainable_weights),
                "non_trainable": len(net.non_trainable_weights),
                "random_states": len(rng_states(net))},
      noise_floor_loss=noise_loss,
      noise_floor_weight=noise_weight, dtype=config.dtype, fit_eval=fit_eval,
      loop_eval=loop_eval, passed=not failures, failures=failures)


def format_report(report: Report, *, first: int = 5, worst: int = 5) -> str:
  """The human-readable table and summary."""
  diffs = [abs(f - l) for f, l in zip(report.fit_losses, report.loop_losses)]
  rows = list(range(min(first, len(diffs))))
  rows += [i for i in sorted(range(len(diffs)), key=lambda i: -diffs[i])
           [:worst] if i not in rows]
  lines = [f"{'step':>6}  {'fit loss':>12}  {'loop loss':>12}  {'|diff|':>10}"]
  for i in rows:
    lines.append(f"{i:>6}  {report.fit_losses[i]:>12.8f}  "
                 f"{report.loop_losses[i]:>12.8f}  {diffs[i]:>10.3g}")
  t = report.tolerance
  lines += [
      "",
      f"mode: {report.mode} ({report.steps} steps, {report.dtype})",
      f"max |loss diff|:   {report.max_loss_diff:.3g} at step "
      f"{report.worst_step} (tolerance {t.loss:g})",
      f"max |weight diff|: {report.max_weight_diff:.3g} in "
      f"{report.worst_weight} (tolerance {t.weight:g}; over "
      f"{report.compared['trainable']} trainable and "
      f"{report.compared['non_trainable']} non-trainable variables and "
      f"{report.compared['random_states']} random states)",
      "fit per-batch loss recovery error: " + (
          "n/a (fit's replicas draw their own dropout masks or batch "
          "statistics)" if report.fit_loss_recovery_error is None else
          f"{report.fit_loss_recovery_error:.3g}"),
  ]
  if report.noise_floor_weight is not None:
    lines.append(
        f"noise floor (one-device fit vs itself with one weight moved one "
        f"ulp): |loss diff| {report.noise_floor_loss:.3g}, |weight diff| "
        f"{report.noise_floor_weight:.3g}")
  lines += [
      f"eval accuracy: loop {report.loop_eval['accuracy']:.6f} "
      f"({report.loop_eval['correct']}/{report.loop_eval['count']}), "
      f"model.evaluate {report.fit_eval['accuracy']:.6f} "
      f"({report.fit_eval['correct']}/{report.fit_eval['count']})",
      f"eval loss: loop {report.loop_eval['loss']:.8f}, model.evaluate "
      f"{report.fit_eval['loss']:.8f} (tolerance {t.eval_loss:g})",
  ]
  lines += [f"FAIL: {f}" for f in report.failures]
  lines.append("PASS" if report.passed else "FAIL")
  return "\n".join(lines)
