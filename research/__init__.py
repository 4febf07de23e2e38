"""A custom-training-loop research codebase for TensorFlow 2.

Modules, one concern each:

- ``model``: the CIFAR-10 ConvNet (subclassed) and the seed's Sequential form.
- ``data``: data sources (official CIFAR-10 batches, an image folder, synthetic)
  and the ``tf.data`` input pipeline.
- ``distribute``: choosing and creating the ``tf.distribute`` strategy.
- ``steps``: the replica train/eval steps and the multi-step ``tf.function``s.
- ``loop``: the outer training loop (epochs, evaluation, checkpoints, logging).
- ``summaries``: TensorBoard writers.
- ``checkpoints``: checkpoint saving, restoring and fallback.
- ``preemption``: graceful stop on SIGTERM, agreed by every worker.
- ``equivalence``: the step-by-step comparison with ``model.fit``.
- ``benchmarking``: side-by-side throughput measurement.
- ``options``: names of the accepted choices (importable without TensorFlow).
- ``errors``: the error type for mistakes a user can fix.
"""
