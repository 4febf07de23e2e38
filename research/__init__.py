"""A custom-training-loop research codebase for TensorFlow 2.

Modules, one concern each:

- ``config``: the run's configuration, a tree of frozen dataclasses.
- ``train``: a training run wired top to bottom (``train``).
- ``controller``: the cadence: call sizes, evaluations, checkpoints, stops.
- ``actions``: the list of a run's side concerns (``run_actions``).
- ``training``: the one builder of model, optimizer, step functions and
  counters (``build_training``), and the trainer the controller drives.
- ``steps``: the replica train/eval steps and the multi-step ``tf.function``s.
- ``model``: the models and their registry (the CIFAR-10 ConvNet and the
  seed's Sequential form).
- ``data``: data sources and their registry, the validation split, and the
  ``tf.data`` pipeline.
- ``calibration``: NLL, Brier score and expected calibration error.
- ``selection``: the best checkpoint and early stopping, as actions.
- ``evaluation``: evaluating a run's checkpoint apart from training.
- ``registry``: the named registries behind ``--model`` and ``--dataset``.
- ``optim``: optimizers and learning-rate schedules.
- ``distribute``: choosing and creating the ``tf.distribute`` strategy.
- ``checkpoints``: checkpoint saving, restoring and fallback.
- ``summaries``: TensorBoard writers (buffered, de-duplicated on resume).
- ``reporting``: console lines and summaries, as actions.
- ``figures``: the images drawn for TensorBoard.
- ``profiling``: a profiler trace of chosen steps, as an action.
- ``preemption``: graceful stop on SIGTERM, agreed by every worker.
- ``export``: the serving SavedModel, and rebuilding a run's model.
- ``run_record``: where a result came from (command, versions, devices).
- ``equivalence``: the step-by-step comparison with ``model.fit``.
- ``benchmarking``: side-by-side throughput measurement.
- ``options``: the fixed lists of choices (importable without TensorFlow).
- ``errors``: the error types for mistakes a user can fix.
- ``files``: crash-safe file writes.
"""
