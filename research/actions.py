"""The list of a run's actions: everything the controller does not own.

``run_actions`` says, in one place, what happens around the training calls
of a run: console lines and scalars, histograms, evaluation images, the
profiler trace, the best checkpoint and early stopping, and the export at
the end. A new side concern is one more
``controller.Action`` in this list; the controller does not change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from research import data as data_lib
from research import export as export_lib
from research import optim
from research.config import ModelConfig
from research.config import TrainConfig
from research.controller import Action
from research.controller import Evaluation
from research.profiling import StepProfiler
from research.reporting import EvalImageReporter
from research.reporting import HistogramReporter
from research.reporting import ProgressReporter
from research.selection import BestCheckpoint
from research.selection import EarlyStopping
from research.selection import SelectionState
from research.summaries import SummaryManager
from research.training import TrainingState


class ExportAction(Action):
  """At the end of training, writes the serving SavedModel: of the best
  checkpoint when there is one, else of the trained weights.

  ``export_dir`` is where it went (None until then).
  """

  def __init__(self, *, state: TrainingState, model_config: ModelConfig,
               export_dir: str, class_names, image_shape,
               log: Callable[[str], None],
               best: BestCheckpoint | None = None, model_dir: str = ""):
    """Args:
      state: The trained state (its evaluation weights are exported).
      model_config: The registered model it is.
      export_dir: Where the SavedModel goes (replaced atomically).
      class_names: Name of each label id.
      image_shape: ``(H, W, C)`` the model takes.
      log: Receives one line naming the export.
      best: The best-checkpoint action, whose weights are exported.
      model_dir: The run directory (to rebuild the model of ``best``).
    """
    self.state = state
    self.model_config = model_config
    self.target = export_dir
    self.class_names = class_names
    self.image_shape = image_shape
    self.log = log
    self.best = best
    self.model_dir = model_dir
    self.export_dir = None

  def at_end(self, evaluation: Evaluation) -> None:
    del evaluation
    if self.best is not None and self.best.path:
      model, _, _ = export_lib.load_model_from_run(self.model_dir,
                                                   self.best.path)
      what = f"the best checkpoint ({self.best.metric})"
      self._export(model)
    else:
      what = "the trained weights"
      if optim.averaged_weights(self.state.optimizer) is not None:
        what = "the averaged weights"
      with self.state.evaluation_weights():
        self._export(self.state.model)
    self.log(f"exported a SavedModel of {what} to {self.export_dir}")

  def _export(self, model) -> None:
    self.export_dir = export_lib.export_saved_model(
        model, self.target, class_names=self.class_names,
        image_shape=self.image_shape, model_config=self.model_config)


@dataclasses.dataclass(frozen=True)
class RunActions:
  """A run's actions, with handles on the two whose results the run reports.

  Attributes:
    all: Every action, in the order they run.
    progress: The console and scalars reporter (its throughput).
    export: The export at the end (its directory), or None.
    best: The best-checkpoint action (its info), or None.
  """
  all: tuple[Action, ...]
  progress: ProgressReporter
  export: ExportAction | None
  best: BestCheckpoint | None = None


def run_actions(config: TrainConfig, *, state: TrainingState,
                data: data_lib.ArrayData, summaries: SummaryManager,
                total_steps: int, steps_per_epoch: int, is_chief: bool,
                log: Callable[[str], None],
                selection: SelectionState | None = None) -> RunActions:
  """The actions of a training run, in the order they run.

  Args:
    config: The run's settings.
    state: The trained state.
    data: The dataset (class names, image shape, sample test images).
    summaries: Where summaries go (a no-op one on non-chief workers).
    total_steps: Steps of the whole run.
    steps_per_epoch: Steps per epoch.
    is_chief: Whether this process writes the run's outputs.
    log: The console.
    selection: The checkpointed selection state (with ``best_metric``).

  Returns:
    The actions.
  """
  reporting = config.reporting
  progress = ProgressReporter(
      summaries=summaries, log=log, model=state.model,
      total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      global_batch_size=config.step.global_batch_size,
      class_names=data.class_names, skipped_steps=state.skipped_steps,
      log_skipped_steps=config.step.nan_policy == "skip")
  actions: list[Action] = [
      progress,
      EvalImageReporter(
          summaries=summaries, model=state.model,
          evaluation_weights=state.evaluation_weights,
          test_time_augmentation=config.model.test_time_augmentation,
          class_names=data.class_names,
          sample_images={
              name: tuple(array[:reporting.eval_images]
                          for array in data.eval_set(name))
              for name in data.eval_set_names}),
  ]
  if reporting.histogram_every_steps:
    actions.append(HistogramReporter(
        summaries=summaries, model=state.model,
        every_steps=reporting.histogram_every_steps))
  if reporting.profile_steps:
    actions.append(StepProfiler(logdir=config.model_dir,
                                steps=reporting.profile_steps,
                                enabled=is_chief))
  best = None
  if config.loop.best_metric:
    best = BestCheckpoint(metric=config.loop.best_metric, state=selection,
                          checkpoint=state.checkpoint,
                          model_dir=config.model_dir, is_chief=is_chief,
                          log=log, class_names=data.class_names)
    actions.append(best)
    if config.loop.early_stopping_patience:
      actions.append(EarlyStopping(
          best=best, patience=config.loop.early_stopping_patience,
          min_delta=config.loop.early_stopping_min_delta))
  export = None
  if reporting.export and is_chief:
    export = ExportAction(
        state=state, model_config=config.model,
        export_dir=os.path.join(config.model_dir, export_lib.EXPORT_SUBDIR),
        class_names=data.class_names, image_shape=data.image_shape, log=log,
        best=best, model_dir=config.model_dir)
    actions.append(export)
  return RunActions(tuple(actions), progress, export, best)
