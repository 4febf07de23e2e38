"""Runs several equivalence comparisons in one fresh process (for the tests).

  python tests/equivalence_batch.py CASES.json REPORTS.json

CASES.json maps a case name to ``{"data": {...}, "config": {...}}``: the
synthetic data's sizes and the ``EquivalenceConfig`` fields (``model`` and
``optimizer`` as dicts of their fields). REPORTS.json gets each case's
report, its formatted text under ``"text"``. A process of its own because
the verifier's conditions are process-wide: oneDNN's graph rewrites off
(before TensorFlow loads) and two logical CPUs. It costs one TensorFlow
start for all the cases instead of one per case; scripts/verify_equivalence.py
itself is run by the tests as well.
"""

import json
import os
import sys

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # As the verifier does.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
sys.path.insert(0, TESTS)

import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import config as tf_config  # noqa: E402

from research import data as data_lib  # noqa: E402
from research import equivalence  # noqa: E402
from research import model as model_lib  # noqa: E402
from research.config import ModelConfig, OptimizerConfig  # noqa: E402
from research.files import write_json  # noqa: E402


def main(cases_path, reports_path):
  with open(cases_path) as f:
    cases = json.load(f)
  import test_registries  # The tiny MLP without a Sequential twin.
  model_lib.register_model("tiny_mlp", test_registries.tiny_mlp)
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  reports = {}
  for name, case in cases.items():
    settings = dict(case["config"])
    settings["model"] = ModelConfig(**settings.get("model", {}))
    settings["optimizer"] = OptimizerConfig(**settings.get("optimizer", {}))
    settings.setdefault("dtype", equivalence.default_dtype(
        settings.get("replicas", 1), settings.get("fit_replicas", 1)))
    config = equivalence.EquivalenceConfig(**settings)
    # As the verifier: op determinism, except with XLA (TensorFlow has no
    # deterministic XLA MaxPool gradient; XLA on CPU is deterministic).
    if config.jit_compile:
      tf_config.disable_op_determinism()
    else:
      tf_config.enable_op_determinism()
    data = data_lib.make_synthetic(seed=config.seed, **case["data"])
    report = equivalence.run(config, data, devices)
    reports[name] = dict(report.to_json(),
                         text=equivalence.format_report(report))
  write_json(reports_path, reports)


if __name__ == "__main__":
  main(*sys.argv[1:])
