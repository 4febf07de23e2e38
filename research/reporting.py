"""What a run reports: console lines and TensorBoard summaries.

Tags (TensorBoard runs ``<model_dir>/train`` and ``<model_dir>/eval``):

- train, every step: ``learning_rate`` (the rate of that step's update),
  ``grad_norm`` (L2 norm of the global gradient, before clipping).
- train, every loop (``steps_per_loop`` steps): ``loss`` and ``accuracy``
  (means over the loop's steps), ``weight_norm``, ``steps_per_second``,
  ``examples_per_second``, and ``skipped_steps`` under ``nan_policy=skip``.
- train, every ``histogram_every_steps``: histograms ``weights/<variable>``
  and ``gradients/<variable>`` (the loop's last applied gradient).
- eval, every evaluation: ``loss``, ``accuracy``, ``class_accuracy/<class>``,
  and images ``predictions`` (a grid of test images, true / predicted) and
  ``confusion_matrix``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from research import data as data_lib
from research import figures
from research.summaries import SummaryManager


def format_duration(seconds: float) -> str:
  """``75`` -> ``1m15s``; ``3700`` -> ``1h01m40s``."""
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class TrainReporter:
  """Turns each loop's and evaluation's results into logs and summaries."""

  def __init__(self, *, summaries: SummaryManager,
               log: Callable[[str], None], model: tf.keras.Model,
               total_steps: int, steps_per_epoch: int, global_batch_size: int,
               class_names: Sequence[str], histogram_every_steps: int = 0,
               log_skipped_steps: bool = False):
    """Args:
      summaries: Where summaries go (a no-op one on non-chief workers).
      log: Receives one console line per loop and per evaluation.
      model: The trained model (for weight norms and histograms).
      total_steps: Steps of the whole run (for progress and ETA).
      steps_per_epoch: Steps per epoch (for the epoch shown).
      global_batch_size: Examples per step.
      class_names: Name of each label id.
      histogram_every_steps: Histogram period in steps (0: never).
      log_skipped_steps: Also log the count of skipped steps.
    """
    self.summaries = summaries
    self.log = log
    self.model = model
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.global_batch_size = global_batch_size
    self.class_names = list(class_names)
    self.histogram_every_steps = histogram_every_steps
    self.log_skipped_steps = log_skipped_steps
    self.train_seconds = 0.0
    self.train_examples = 0
    self._calls = 0

  @property
  def examples_per_second(self) -> float | None:
    """Mean training throughput, leaving out the first (tracing) call."""
    return (self.train_examples / self.train_seconds if self.train_seconds
            else None)

  def histograms_due(self, step: int, num_steps: int) -> bool:
    """Whether a call running steps ``step+1..step+num_steps`` crosses a
    multiple of ``histogram_every_steps`` (the call's end is logged)."""
    every = self.histogram_every_steps
    return bool(every) and (step + num_steps) // every > step // every

  def train_loop(self, *, step: int, num_steps: int, out: dict,
                 seconds: float, skipped_total: int) -> None:
    """Reports one ``train_steps`` call that ended at global step ``step``.

    Args:
      step: The global step after the call.
      num_steps: Steps the call ran.
      out: ``StepRunner.train_steps``' outputs.
      seconds: Wall time of the call.
      skipped_total: Steps skipped so far in the run.
    """
    self._calls += 1
    count = int(out["count"])
    # The first call includes tracing; leave it out of the mean rate.
    if self._calls > 1 or step >= self.total_steps:
      self.train_seconds += seconds
      self.train_examples += count
    examples_per_second = count / max(seconds, 1e-9)
    rate = self.examples_per_second or examples_per_second
    eta = ((self.total_steps - step) * self.global_batch_size /
           max(rate, 1e-9))
    losses = out["step_losses"].numpy()
    finite = losses[np.isfinite(losses)]
    loss = float(finite.mean()) if len(finite) else float("nan")
    accuracy = int(out["correct"]) / max(count, 1)
    first = step - num_steps + 1
    rates = out["step_learning_rates"].numpy()
    norms = out["step_grad_norms"].numpy()
    for i in range(num_steps):
      self.summaries.scalars("train", {"learning_rate": rates[i],
                                       "grad_norm": norms[i]}, first + i)
    weight_norm = float(tf.linalg.global_norm(self.model.trainable_variables))
    scalars = {"loss": loss, "accuracy": accuracy,
               "weight_norm": weight_norm,
               "steps_per_second": num_steps / max(seconds, 1e-9),
               "examples_per_second": examples_per_second}
    if self.log_skipped_steps:
      scalars["skipped_steps"] = skipped_total
    self.summaries.scalars("train", scalars, step)
    if self.histograms_due(step - num_steps, num_steps):
      variables = self.model.trainable_variables
      self.summaries.histograms(
          "train", {f"weights/{v.path}": v.numpy() for v in variables}, step)
      self.summaries.histograms(
          "train", {f"gradients/{v.path}": g.numpy()
                    for v, g in zip(variables, out["last_gradients"])}, step)
    skipped_note = f" skipped {skipped_total}" if skipped_total else ""
    self.log(f"train step {step}/{self.total_steps} epoch "
             f"{step / self.steps_per_epoch:.2f} loss {loss:.4f} accuracy "
             f"{accuracy:.4f} lr {rates[num_steps - 1]:.3g} grad_norm "
             f"{norms[num_steps - 1]:.3g} {examples_per_second:,.0f} ex/s "
             f"ETA {format_duration(eta)}{skipped_note}")

  def evaluation(self, *, step: int, result: dict, seconds: float,
                 sample_images: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> None:
    """Reports an evaluation at global step ``step``.

    Args:
      step: The global step.
      result: ``StepRunner.evaluate``'s result.
      seconds: Its wall time.
      sample_images: ``(images, labels)``: uint8 test images and their
        labels, shown with the model's predictions (None or no images: no
        grid).
    """
    scalars = {"loss": result["loss"], "accuracy": result["accuracy"]}
    for name, value in zip(self.class_names, result["class_accuracy"]):
      if np.isfinite(value):
        scalars[f"class_accuracy/{name}"] = float(value)
    self.summaries.scalars("eval", scalars, step)
    if self.summaries.enabled:
      images = {"confusion_matrix": figures.confusion_matrix_image(
          result["confusion"], self.class_names)}
      if sample_images is not None and len(sample_images[0]):
        pixels, labels = sample_images
        logits = self.model(data_lib.to_float(pixels), training=False)
        predictions = np.argmax(np.asarray(logits), axis=-1)
        images["predictions"] = figures.prediction_grid(
            pixels, labels, predictions, self.class_names)
      self.summaries.images("eval", images, step)
    self.log(f"eval  step {step}/{self.total_steps} epoch "
             f"{step / self.steps_per_epoch:.2f} loss {result['loss']:.4f} "
             f"accuracy {result['accuracy']:.4f} "
             f"({result['correct']}/{result['count']}) {seconds:.1f}s")


def hparams_of(config) -> dict:
  """A config's fields as HParams values (bool, int, float or str)."""
  values = {}
  for name, value in dataclasses.asdict(config).items():
    if name == "model_dir":
      continue
    if value is None or isinstance(value, (tuple, list)):
      value = str(value)
    values[name] = value
  return values

