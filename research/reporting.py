"""What a run reports: console lines and TensorBoard summaries, as actions.

Tags (TensorBoard runs ``<model_dir>/train`` and one per evaluation set,
``<model_dir>/validation`` and ``<model_dir>/test``, so their curves overlay):

- train, every step: ``learning_rate`` (the rate of that step's update),
  ``grad_norm`` (L2 norm of the global gradient, before clipping).
- train, every call (``steps_per_loop`` steps): ``loss`` and ``accuracy``
  (means over the call's steps), ``weight_norm``, ``steps_per_second``,
  ``examples_per_second``, and ``skipped_steps`` under ``nan_policy=skip``.
- train, every ``histogram_every_steps``: histograms ``weights/<variable>``
  and ``gradients/<variable>`` (the call's last applied gradient).
- each evaluated set, every evaluation: ``loss``, ``accuracy``, ``class_accuracy/<class>``,
  ``nll``, ``brier`` and ``ece`` (``calibration``), and images
  ``predictions`` (a grid of the set's first images, true / predicted),
  ``confusion_matrix`` and ``reliability_diagram``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import tensorflow as tf

from research import config as config_lib
from research import data as data_lib
from research import figures
from research import model as model_lib
from research.options import METRIC_DIRECTIONS
from research.controller import Action
from research.controller import Evaluation
from research.controller import TrainCall
from research.summaries import SummaryManager


def format_duration(seconds: float) -> str:
  """``75`` -> ``1m15s``; ``3700`` -> ``1h01m40s``."""
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressReporter(Action):
  """Console lines and scalar summaries of every call and evaluation."""

  def __init__(self, *, summaries: SummaryManager,
               log: Callable[[str], None], model: tf.keras.Model,
               total_steps: int, steps_per_epoch: int, global_batch_size: int,
               class_names: Sequence[str], skipped_steps: tf.Variable,
               log_skipped_steps: bool = False):
    """Args:
      summaries: Where summaries go (a no-op one on non-chief workers).
      log: Receives one console line per call and per evaluation.
      model: The trained model (for the weight norm).
      total_steps: Steps of the whole run (for progress and ETA).
      steps_per_epoch: Steps per epoch (for the epoch shown).
      global_batch_size: Examples per step.
      class_names: Name of each label id.
      skipped_steps: The run's count of skipped steps (over every
        invocation), shown when not 0.
      log_skipped_steps: Also log the count of skipped steps.
    """
    self.summaries = summaries
    self.log = log
    self.model = model
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.global_batch_size = global_batch_size
    self.class_names = list(class_names)
    self.skipped_steps = skipped_steps
    self.log_skipped_steps = log_skipped_steps
    self.train_seconds = 0.0
    self.train_examples = 0
    self._calls = 0

  @property
  def examples_per_second(self) -> float | None:
    """Mean training throughput, leaving out the first (tracing) call."""
    return (self.train_examples / self.train_seconds if self.train_seconds
            else None)

  def after_train(self, call: TrainCall) -> None:
    """Logs the call's line and queues its scalars (see the module)."""
    out, step, num_steps = call.outputs, call.step, call.num_steps
    self._calls += 1
    skipped_total = int(self.skipped_steps.numpy())
    count = int(out["count"])
    # The first call includes tracing; leave it out of the mean rate.
    if self._calls > 1 or step >= self.total_steps:
      self.train_seconds += call.seconds
      self.train_examples += count
    examples_per_second = count / max(call.seconds, 1e-9)
    rate = self.examples_per_second or examples_per_second
    eta = ((self.total_steps - step) * self.global_batch_size /
           max(rate, 1e-9))
    losses = out["step_losses"].numpy()
    finite = losses[np.isfinite(losses)]
    loss = float(finite.mean()) if len(finite) else float("nan")
    accuracy = int(out["correct"]) / max(count, 1)
    rates = out["step_learning_rates"].numpy()
    norms = out["step_grad_norms"].numpy()
    for i in range(num_steps):
      self.summaries.scalars("train", {"learning_rate": rates[i],
                                       "grad_norm": norms[i]},
                             call.first_step + 1 + i)
    weight_norm = float(tf.linalg.global_norm(self.model.trainable_variables))
    scalars = {"loss": loss, "accuracy": accuracy,
               "weight_norm": weight_norm,
               "steps_per_second": num_steps / max(call.seconds, 1e-9),
               "examples_per_second": examples_per_second}
    if self.log_skipped_steps:
      scalars["skipped_steps"] = skipped_total
    self.summaries.scalars("train", scalars, step)
    skipped_note = f" skipped {skipped_total}" if skipped_total else ""
    self.log(f"train step {step}/{self.total_steps} epoch "
             f"{step / self.steps_per_epoch:.2f} loss {loss:.4f} accuracy "
             f"{accuracy:.4f} lr {rates[num_steps - 1]:.3g} grad_norm "
             f"{norms[num_steps - 1]:.3g} {examples_per_second:,.0f} ex/s "
             f"ETA {format_duration(eta)}{skipped_note}")

  def after_evaluation(self, evaluation: Evaluation) -> None:
    """Logs a line per evaluated set and queues its scalars."""
    step = evaluation.step
    for set_name, result in evaluation.result.items():
      self.summaries.scalars(set_name,
                             evaluation_scalars(result, self.class_names),
                             step)
      self.log(f"eval {set_name} step {step}/{self.total_steps} epoch "
               f"{step / self.steps_per_epoch:.2f} loss "
               f"{result['loss']:.4f} accuracy {result['accuracy']:.4f} "
               f"({result['correct']}/{result['count']}) ece "
               f"{result['ece']:.4f} {evaluation.seconds:.1f}s")


def evaluation_scalars(result: dict[str, Any], class_names: Sequence[str]
                       ) -> dict[str, float]:
  """One set's evaluation (``StepRunner.evaluate``) as the scalars
  TensorBoard shows: loss, accuracy, calibration, per-class accuracy (of the
  classes the set has)."""
  scalars = {name: result[name] for name in METRIC_DIRECTIONS}
  for name, value in zip(class_names, result["class_accuracy"]):
    if np.isfinite(value):
      scalars[f"class_accuracy/{name}"] = float(value)
  return scalars


# The keys of evaluation_summary.
SUMMARY_KEYS = (*METRIC_DIRECTIONS, "correct", "count", "class_accuracy")


def evaluation_summary(result: dict[str, Any], class_names: Sequence[str]
                       ) -> dict[str, Any]:
  """One set's evaluation as JSON files keep it (``metrics.json``,
  ``best/info.json``, the sidecar's ``evaluations.json``).

  Args:
    result: What ``StepRunner.evaluate`` returned for the set.
    class_names: The dataset's class names.

  Returns:
    ``SUMMARY_KEYS``: the metrics (floats), ``correct`` and ``count``
    (ints), and ``class_accuracy`` by class name.
  """
  summary = {name: float(result[name]) for name in METRIC_DIRECTIONS}
  summary["correct"] = int(result["correct"])
  summary["count"] = int(result["count"])
  summary["class_accuracy"] = dict(zip(
      class_names, [float(a) for a in result["class_accuracy"]]))
  return summary


class HistogramReporter(Action):
  """Weight and gradient histograms every ``every_steps`` steps.

  A call that crosses a multiple of ``every_steps`` logs at its end, with the
  call's last applied gradient (the runner must keep it:
  ``keep_last_gradients``).
  """

  def __init__(self, *, summaries: SummaryManager, model: tf.keras.Model,
               every_steps: int):
    """Args:
      summaries: Where summaries go.
      model: The trained model.
      every_steps: The period, >= 1.

    Raises:
      ValueError: if ``every_steps`` < 1.
    """
    if every_steps < 1:
      raise ValueError(f"every_steps must be >= 1, got {every_steps}")
    self.summaries = summaries
    self.model = model
    self.every_steps = every_steps

  def due(self, call: TrainCall) -> bool:
    """Whether the call crosses a multiple of the period."""
    return call.step // self.every_steps > call.first_step // self.every_steps

  def after_train(self, call: TrainCall) -> None:
    if not self.due(call):
      return
    variables = self.model.trainable_variables
    self.summaries.histograms(
        "train", {f"weights/{v.path}": v.numpy() for v in variables},
        call.step)
    self.summaries.histograms(
        "train", {f"gradients/{v.path}": g.numpy() for v, g in
                  zip(variables, call.outputs["last_gradients"])}, call.step)


class EvalImageReporter(Action):
  """After each evaluation: the confusion matrix, the reliability diagram
  and a grid of predictions."""

  def __init__(self, *, summaries: SummaryManager, model: tf.keras.Model,
               class_names: Sequence[str],
               sample_images: dict[str, tuple[np.ndarray, np.ndarray]],
               evaluation_weights: Callable[[], ContextManager] =
               contextlib.nullcontext,
               test_time_augmentation: dict[str, Any] | None = None):
    """Args:
      summaries: Where summaries go.
      model: The trained model.
      class_names: Name of each label id.
      sample_images: Per evaluation set, ``(images, labels)``: uint8 images
        and their labels, shown with the model's predictions (no images: no
        grid).
      evaluation_weights: Within it, the model holds the weights that were
        evaluated (``TrainingState.evaluation_weights``).
      test_time_augmentation: Predict as the evaluation did
        (``StepRunner``'s argument of that name).
    """
    self.summaries = summaries
    self.model = model
    self.evaluation_weights = evaluation_weights
    self.class_names = list(class_names)
    self.sample_images = sample_images
    self.test_time_augmentation = dict(test_time_augmentation or {})

  def after_evaluation(self, evaluation: Evaluation) -> None:
    if not self.summaries.enabled:
      return  # Drawing costs a second; only the chief writes.
    for set_name, result in evaluation.result.items():
      images = {"confusion_matrix": figures.confusion_matrix_image(
          result["confusion"], self.class_names),
                "reliability_diagram": figures.reliability_diagram_image(
                    result["reliability"], result["ece"])}
      pixels, labels = self.sample_images[set_name]
      if len(pixels):
        with self.evaluation_weights():
          logits = model_lib.inference_logits(
              self.model, data_lib.to_float(pixels),
              **self.test_time_augmentation)
        predictions = np.argmax(np.asarray(logits), axis=-1)
        images["predictions"] = figures.prediction_grid(
            pixels, labels, predictions, self.class_names)
      self.summaries.images(set_name, images, evaluation.step)


def hparams_of(config: config_lib.TrainConfig) -> dict:
  """A config's fields, flat, as HParams values (bool, int, float or str)."""
  values = {}
  for name, value in config_lib.to_flat(config).items():
    if name == "model_dir":
      continue
    if value is None or isinstance(value, (tuple, list)):
      value = str(value)
    values[name] = value
  return values

