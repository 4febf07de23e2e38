"""Runs several equivalence comparisons in one fresh process (for the tests).

  python tests/equivalence_batch.py CASES.json REPORTS.json

CASES.json maps a case name to ``{"data": {...}, "config": {...}}``: the
synthetic data's sizes and the ``EquivalenceConfig`` fields (``model`` and
``optimizer`` as dicts of their fields), or to ``{"script": [flags]}``: a
run of scripts/verify_equivalence.py itself, through its ``run(flags,
argv)`` as its command line would (its exit status and output are the
report). REPORTS.json gets each case's report, its formatted text under
``"text"``. A process of its own because the verifier's conditions are
process-wide: oneDNN's graph rewrites off (before TensorFlow loads) and two
logical CPUs. It costs one TensorFlow start for all the cases instead of one
per case.
"""

import json
import os
import sys
import time

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # As the verifier does.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "scripts"))

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
  # As many logical CPUs as the largest strategy needs (conftest splits
  # the CPU when test_registries imports it).
  os.environ["RESEARCH_TEST_CPU_REPLICAS"] = str(max(
      [2] + [case["config"].get(key, 1) for case in cases.values()
             if "config" in case for key in ("replicas", "fit_replicas")]))
  import test_registries
  # BUILD.md's worked example, for a case that names it (none does now: the
  # ResNet is the registered model without a Sequential twin).
  model_lib.register_model("tiny_mlp", test_registries.tiny_mlp)
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  reports = {}
  for name, case in cases.items():
    started = time.perf_counter()
    if "script" in case:
      reports[name] = _run_script(case["script"])
      reports[name]["seconds"] = time.perf_counter() - started
      continue
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
    # Seconds: where the suite's time goes.
    reports[name] = dict(report.to_json(),
                         text=equivalence.format_report(report),
                         seconds=time.perf_counter() - started)
  write_json(reports_path, reports)


def _run_script(args):
  """verify_equivalence.py with ``args``: its status, stdout and
  --json_out report."""
  import contextlib
  import io
  import tempfile
  from absl import flags
  import cli_common
  import verify_equivalence
  fv = flags.FlagValues()
  verify_equivalence.define_flags(fv)
  out = os.path.join(tempfile.mkdtemp(), "report.json")
  argv = ["verify_equivalence.py", *args, f"--json_out={out}"]
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    try:
      status = verify_equivalence.run(
          fv, cli_common.parse_flags_or_exit(argv, fv))
    except SystemExit as e:
      status = e.code
  with open(out) as f:
    report = json.load(f)
  return {"returncode": status, "stdout": stdout.getvalue(),
          "report": report}


if __name__ == "__main__":
  main(*sys.argv[1:])
