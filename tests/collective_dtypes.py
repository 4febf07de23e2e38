"""Prints the dtype of every collective op the trainer's graphs hold.

  TF_CONFIG=... python tests/collective_dtypes.py OUT.json

Run as each worker of a 2-worker ``MultiWorkerMirroredStrategy`` cluster
(test_gpu_readiness.py starts them): traces, without running, the train step
(with ``keep_short_batch``, whose batch size is all-reduced), the eval step
and the preemption vote, and writes ``[[function, op, dtype], ...]``. GPUs
refuse int32 collectives (tensorflow#56184); CPUs take them, so only the
graphs can show one on a machine without GPUs.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from research import data as data_lib  # noqa: E402
from research import distribute  # noqa: E402
from research import preemption  # noqa: E402
from research.config import ModelConfig  # noqa: E402
from research.config import OptimizerConfig  # noqa: E402
from research.config import StepConfig  # noqa: E402
from research.files import write_json  # noqa: E402
from research.training import build_training  # noqa: E402


def collectives(concrete) -> list[tuple[str, str]]:
  """``(op type, dtype)`` of each collective op in a traced function and
  the functions it calls (loop bodies, nested tf.functions)."""
  graph = concrete.graph.as_graph_def()
  nodes = list(graph.node) + [node for function in graph.library.function
                              for node in function.node_def]
  return [(node.op, tf.dtypes.as_dtype(node.attr["T"].type).name, node.name)
          for node in nodes
          if node.op.startswith(("Collective", "Nccl")) and "T" in node.attr]


def main(out_path: str) -> None:
  strategy = distribute.create_strategy("multi_worker_mirrored")
  batch = 8 * strategy.num_replicas_in_sync
  _, runner = build_training(
      strategy=strategy, model_config=ModelConfig(),
      optimizer_config=OptimizerConfig(),
      step_config=StepConfig(global_batch_size=batch, keep_short_batch=True),
      num_classes=10, image_shape=(32, 32, 3), total_steps=4)
  data = data_lib.make_synthetic(num_train=20, num_test=8, seed=0)
  train = iter(strategy.distribute_datasets_from_function(
      lambda context: data_lib.make_train_dataset(
          data, global_batch_size=batch, seed=0, num_epochs=1,
          drop_remainder=False, input_context=context)))
  evaluation = iter(strategy.distribute_datasets_from_function(
      lambda context: data_lib.make_eval_dataset(
          data, global_batch_size=batch, input_context=context)))
  watcher = preemption.PreemptionWatcher(strategy, signals=())
  traced = {
      "train_steps": runner.train_steps.get_concrete_function(
          train, tf.constant(1)),
      "eval_steps": runner.eval_steps.get_concrete_function(
          evaluation, tf.constant(1)),
      "preemption_vote": watcher._vote.get_concrete_function(  # pylint: disable=protected-access
          watcher.vote_input(0)),
  }
  write_json(out_path, [[name, op, dtype, node] for name, function in traced.items()
                        for op, dtype, node in collectives(function)])


if __name__ == "__main__":
  main(sys.argv[1])
