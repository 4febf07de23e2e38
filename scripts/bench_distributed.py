#!/usr/bin/env python3
"""Training throughput of one process, 2 logical replicas, and 2 workers.

  python scripts/bench_distributed.py --repeats=3 [--json_out=...]

Runs scripts/train_loop.py (and scripts/launch_local.py) on synthetic data at
the same global batch, alternating the three set-ups (A B C A B C ...) so
drift on a shared machine hits all of them, and reports the median of each
run's mean training examples/s (from metrics.json; tracing excluded).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)

FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_integer("repeats", 3, "Runs of each set-up.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 64,
                       "Global batch size (even: two replicas share it).",
                       lower_bound=2, flag_values=fv)
  flags.register_validator(
      "batch_size", lambda v: v % 2 == 0,
      message="--batch_size must be even: the two-replica set-ups split it",
      flag_values=fv)
  flags.DEFINE_integer("train_size", 8192, "Synthetic training examples.",
                       lower_bound=64, flag_values=fv)
  flags.DEFINE_integer("epochs", 2, "Epochs per run.", lower_bound=1,
                       flag_values=fv)
  cli.define_json_out(fv, "Also write the results here (JSON).")


SETUPS = {
    "1 process x 1 replica": ("train_loop.py", []),
    "1 process x 2 logical CPU replicas": ("train_loop.py",
                                           ["--cpu_replicas=2"]),
    "2 worker processes x 1 replica": ("launch_local.py",
                                       ["--num_workers=2", "--"]),
}


def run_once(script: str, prefix: list[str], common: list[str]) -> float:
  """Trains once with ``scripts/<script> *prefix *common`` in a fresh process.

  Returns:
    The run's training examples per second (from its metrics.json).

  Raises:
    RuntimeError: if the run fails, with the end of its stderr.
  """
  with tempfile.TemporaryDirectory() as model_dir:
    cmd = [sys.executable, os.path.join(HERE, script), *prefix, *common,
           f"--model_dir={model_dir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(model_dir, "metrics.json")) as f:
      return json.load(f)["train_examples_per_second"]


def main(argv):
  cli.refuse_arguments(argv[1:])
  common = ["--dataset=synthetic", f"--synthetic_train_size={FLAGS.train_size}",
            "--synthetic_test_size=256", f"--batch_size={FLAGS.batch_size}",
            f"--epochs={FLAGS.epochs}", "--steps_per_loop=50",
            "--checkpoint_every_steps=0"]
  results = {name: [] for name in SETUPS}
  for r in range(FLAGS.repeats):
    for name, (script, prefix) in SETUPS.items():
      try:
        rate = run_once(script, prefix, common)
      except RuntimeError as e:
        cli.exit_with_error(str(e), status=1)
      results[name].append(rate)
      print(f"repeat {r + 1}: {name}: {rate:,.0f} examples/s", flush=True)
  base = statistics.median(results["1 process x 1 replica"])
  lines = ["| set-up | median examples/s | runs | vs 1 x 1 |",
           "| --- | --- | --- | --- |"]
  for name, rates in results.items():
    median = statistics.median(rates)
    lines.append(f"| {name} | {median:,.0f} | "
                 f"{', '.join(f'{x:,.0f}' for x in rates)} | "
                 f"{median / base:.2f} |")
  print("\n".join(lines))
  if FLAGS.json_out:
    cli.write_json_or_exit(FLAGS.json_out,
                           {"setups": results, "common_flags": common})


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
