"""A training run, wired: config -> data -> state -> controller -> actions.

``train`` reads top to bottom: it sizes the run, builds the state (through
``training.build_training``), restores the latest checkpoint, writes the run's
description files, makes the input pipelines, and hands the cadence to a
``controller.Controller`` with the run's actions (``actions.run_actions``).

The global step is the number of batches consumed (``optimizer.iterations``
unless steps were skipped for a non-finite loss); a resumed run rebuilds the
exact input it would have seen and trains only what is left.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import tensorflow as tf

from research import data as data_lib
from research import distribute
from research import export as export_lib
from research import preemption
from research import resume
from research import run_record as run_record_lib
from research.actions import run_actions
from research.checkpoints import CHECKPOINTS_SUBDIR
from research.checkpoints import CheckpointKeeper
from research.config import TrainConfig
from research.controller import Cadence
from research.controller import Controller
from research.errors import UserError
from research.files import write_json
from research.reporting import SUMMARY_KEYS
from research.reporting import evaluation_summary
from research.reporting import hparams_of
from research.run_lock import RunLock
from research.selection import SelectionState
from research.summaries import SummaryManager
from research.training import StepTrainer
from research.training import build_training


def cadence_of(config: TrainConfig, data: data_lib.ArrayData) -> Cadence:
  """The run's length and rhythm in global steps.

  Raises:
    UserError: if no full batch fits in the training set (and short batches
      are dropped), or warmup is not shorter than the run.
  """
  steps_per_epoch = data_lib.steps_per_epoch(
      len(data.train_labels), config.step.global_batch_size,
      not config.step.keep_short_batch)
  total_steps = config.loop.epochs * steps_per_epoch
  if config.optimizer.warmup_steps >= total_steps:
    raise UserError(f"--warmup_steps={config.optimizer.warmup_steps} must be "
                    f"less than the run's {total_steps} steps")
  return Cadence(total_steps=total_steps,
                 steps_per_loop=config.loop.steps_per_loop,
                 steps_per_epoch=steps_per_epoch,
                 eval_every_steps=config.loop.eval_every_steps,
                 checkpoint_every_steps=config.loop.checkpoint_every_steps)


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy,
          data: data_lib.ArrayData, log: Callable[[str], None] = print,
          run_files: dict[str, dict] | None = None,
          run_record: dict | None = None) -> dict:
  """Trains (or resumes training of) the configured model and evaluates it.

  Args:
    config: The run's settings.
    strategy: The distribution strategy (created before any other op).
    data: The dataset, in memory.
    log: Receives one console line per call and per evaluation.
    run_files: More JSON files to write into ``model_dir`` (chief only) once
      the run is known to be startable (after the checkpoint check), e.g.
      ``{"flags.json": {...}}``. ``config.json`` (the resolved config) and
      ``model.json`` (what ``export.py`` needs to rebuild the model) are
      always written.
    run_record: This invocation's record (``run_record.collect``), appended
      to ``<model_dir>/run_record.json`` by the chief at the same point.

  Returns:
    The final metrics (also written to ``<model_dir>/metrics.json`` by the
    chief): ``evaluations`` (each finally evaluated set's accuracy, loss,
    calibration and per-class accuracy), ``eval_accuracy``, ``eval_loss``,
    ... (those of ``eval_set``: the test set when it was evaluated),
    ``global_step``, ``epochs``, ``wall_seconds``,
    ``train_examples_per_second``, ``skipped_steps``, ``export_dir`` (None
    if not exported), ``best`` (with a best metric: ``best/info.json``, the
    best evaluation), ``stopped_early`` (step and reason, when early
    stopping ended the run), ...

  A run directory that holds a run resumes it only if this configuration
  is the same experiment (``resume.check``; allowed changes are logged and
  recorded); a run that already finished returns its recorded metrics and
  writes nothing.

  Raises:
    UserError: if the run cannot start (see ``cadence_of``; a validation
      split that does not fit, ``data.split_validation``; an evaluation set
      the data does not have), the model
      directory holds another experiment or an incompatible checkpoint, or
      a save or the export fails.
    NonFiniteLossError: on a non-finite loss or gradient with
      ``nan_policy="stop"``; nothing is saved.
    preemption.Preempted: after a SIGTERM, once the checkpoint of the
      current step is saved.
  """
  start_time = time.time()
  chief = distribute.is_chief(strategy)
  data = data_lib.split_validation(data, config.data.validation_size)
  for name in (*config.loop.eval_sets, *config.loop.final_eval_sets):
    data.eval_set(name)  # Refuses a set this data does not have.
  cadence = cadence_of(config, data)
  changes = resume.check(config, data)  # Refuses another experiment.

  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  tf.keras.utils.set_random_seed(config.seed)
  state, runner = build_training(
      strategy=strategy, model_config=config.model,
      optimizer_config=config.optimizer, step_config=config.step,
      num_classes=data.num_classes, image_shape=data.image_shape,
      total_steps=cadence.total_steps,
      keep_last_gradients=config.reporting.histogram_every_steps > 0)
  selection = None
  if config.loop.best_metric:
    # In the checkpoints, so that a resume knows the best so far.
    selection = state.checkpoint.selection = SelectionState()
  keeper = CheckpointKeeper(
      checkpoint=state.checkpoint,
      directory=os.path.join(config.model_dir,
                             CHECKPOINTS_SUBDIR),
      max_to_keep=config.loop.keep_checkpoints, is_chief=chief)
  restored = keeper.restore_latest()
  if state.has_constant_rate:
    # A plain rate lives in a checkpointed variable; the configured one wins.
    state.optimizer.learning_rate = config.optimizer.learning_rate
  if restored:
    log(f"resumed from {restored} at step {state.step}/{cadence.total_steps}")
    recorded = resume.recorded_result(config.model_dir, state.step)
    # A run that stopped early goes on only if this invocation's patience
    # (more of it, or none) would not have stopped it.
    still_stopped = (recorded is not None and recorded.get("stopped_early")
                     and selection is not None and
                     config.loop.early_stopping_patience and
                     int(selection.stale_evaluations.numpy()) >=
                     config.loop.early_stopping_patience)
    if recorded is not None and (state.step >= cadence.total_steps or
                                 still_stopped):
      log(f"the run already finished at step {state.step}; nothing to do "
          f"(its results are in {resume.METRICS_FILE})")
      return recorded
  if changes:
    log("changed since the last invocation: " + ", ".join(
        f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()))
  with contextlib.ExitStack() as held:
    if chief:
      # One writer per run directory, from its first write to its last.
      held.enter_context(RunLock(
          config.model_dir,
          command=run_record["command"] if run_record else ""))
      export_lib.recover_interrupted_export(
          os.path.join(config.model_dir, export_lib.EXPORT_SUBDIR))
      _write_run_files(config, data, run_files, run_record and {
          **run_record, "config_changes": changes})
    summaries = SummaryManager(model_dir=config.model_dir, enabled=chief)
    summaries.hparams(hparams_of(config), trial_id=os.path.basename(
        os.path.abspath(config.model_dir)))
    in_pipeline = not distribute.preprocesses_on_device(strategy)
    trainer = StepTrainer(
        runner=runner, state=state,
        train_dataset=strategy.distribute_datasets_from_function(
            lambda context: data_lib.make_train_dataset(
                data, global_batch_size=config.step.global_batch_size,
                seed=config.seed, num_epochs=config.loop.epochs,
                start_step=state.step,
                drop_remainder=not config.step.keep_short_batch,
                augment=config.data.augment, cutout=config.data.cutout,
                input_context=context,
                preprocess_in_pipeline=in_pipeline)),
        eval_datasets={
            name: _eval_dataset(config, data, strategy, name, in_pipeline)
            for name in data.eval_set_names},
        eval_sets=config.loop.eval_sets,
        steps_per_eval_call=config.loop.steps_per_loop)
    only_at_end = [name for name in config.loop.final_eval_sets
                   if name not in config.loop.eval_sets]
    actions = run_actions(config, state=state, data=data,
                          summaries=summaries,
                          total_steps=cadence.total_steps,
                          steps_per_epoch=cadence.steps_per_epoch,
                          is_chief=chief, log=log, selection=selection)
    watcher = preemption.PreemptionWatcher(strategy)
    held.callback(watcher.close)
    controller = Controller(
        trainer=trainer,
        evaluator=trainer if config.loop.eval_sets else None, cadence=cadence,
        start_step=state.step, checkpointer=keeper, summaries=summaries,
        actions=actions.all, stop_requested=watcher.should_stop,
        stop_on_nonfinite=config.step.nan_policy == "stop",
        final_evaluator=(lambda: trainer.evaluate(only_at_end))
        if only_at_end else None, log=log)
    final = controller.run()
    metrics = _final_metrics(config, data, strategy, state, cadence, actions,
                             final, seconds=time.time() - start_time)
    if controller.stop_reason:
      metrics["stopped_early"] = {"step": state.step,
                                  "reason": controller.stop_reason}
    if chief:
      write_json(os.path.join(config.model_dir, resume.METRICS_FILE),
                 metrics)
  return metrics


def _eval_dataset(config: TrainConfig, data: data_lib.ArrayData,
                  strategy: tf.distribute.Strategy, name: str,
                  in_pipeline: bool) -> tuple[tf.distribute.DistributedDataset,
                                              int]:
  """One evaluation set's distributed dataset and its number of steps."""
  batch = config.step.global_batch_size
  dataset = strategy.distribute_datasets_from_function(
      lambda context: data_lib.make_eval_dataset(
          data, global_batch_size=batch, input_context=context,
          preprocess_in_pipeline=in_pipeline, eval_set=name))
  return dataset, data_lib.eval_steps(len(data.eval_set(name)[1]), batch)


def _final_metrics(config, data, strategy, state, cadence, actions, final, *,
                   seconds: float) -> dict:
  """What ``metrics.json`` holds (see ``train``)."""
  # eval_* (as before evaluation sets): the test set's, when evaluated; None
  # when nothing was (evaluation left to a sidecar).
  headline = "test" if "test" in final.result else next(iter(final.result),
                                                        None)
  headline_metrics = {f"eval_{name}": None for name in SUMMARY_KEYS}
  if headline:
    summary = evaluation_summary(final.result[headline], data.class_names)
    headline_metrics = {f"eval_{name}": value
                        for name, value in summary.items()}
  return {
      **headline_metrics,
      "global_step": state.step,
      "optimizer_steps": int(state.optimizer.iterations.numpy()),
      "skipped_steps": int(state.skipped_steps.numpy()),
      "epochs": config.loop.epochs,
      "steps_per_epoch": cadence.steps_per_epoch,
      "wall_seconds": seconds,
      "train_examples_per_second": actions.progress.examples_per_second,
      "num_replicas": strategy.num_replicas_in_sync,
      "export_dir": actions.export.export_dir if actions.export else None,
      "eval_set": headline,
      "evaluations": {name: evaluation_summary(result, data.class_names)
                      for name, result in final.result.items()},
      "best": actions.best.info() if actions.best else None,
  }


def _write_run_files(config: TrainConfig, data: data_lib.ArrayData,
                     run_files: dict[str, dict] | None,
                     run_record: dict | None) -> None:
  """Writes the files that describe the run, and appends the run record."""
  os.makedirs(config.model_dir, exist_ok=True)
  files = dict(run_files or {})
  files[resume.CONFIG_FILE] = config.to_json()
  files[resume.DATA_FILE] = resume.data_facts(data)
  files[export_lib.MODEL_SPEC_FILE] = export_lib.model_spec(
      class_names=data.class_names, image_shape=data.image_shape,
      model_config=config.model,
      averaged_weights=config.optimizer.ema_decay > 0)
  for name, payload in files.items():
    write_json(os.path.join(config.model_dir, name), payload)
  if run_record is not None:
    run_record_lib.append(config.model_dir, run_record)
