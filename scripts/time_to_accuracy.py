#!/usr/bin/env python3
"""Time to accuracy: two training configs trained alternately, side by side.

  python scripts/time_to_accuracy.py [--baseline=configs/cifar10.flags] \\
      [--candidate=configs/cifar10_fast.flags] [--seeds=0,1,2] \\
      [--work_dir=DIR] [--json_out=tta.json] \\
      -- --dataset=folder --data_dir=/tmp/cifar10-jpeg

For each seed it trains the baseline and then the candidate, each in a fresh
process (``train_loop.py --flagfile=F --seed=S --noexport`` and the flags
after ``--``, in this directory), so the two share the machine's state of the
moment. From each run's metrics.json it reads the training seconds
(``wall_seconds``: from the start of training to its last evaluation,
tracing, evaluations and checkpoints included, the data loading before it
not) and the test accuracy. It prints one row per run, each config's mean +-
standard deviation and the ratio of the mean training seconds, candidate /
baseline. The runs go to a new --work_dir (by default a fresh folder under
the system's temporary one); runs already there are refused before anything
trains: a resumed run would be timed only for its rest, and a finished one
may come from another version of its config.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)

FLAGS = flags.FLAGS
SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("baseline", "configs/cifar10.flags",
                      "The reference config's flagfile.", flag_values=fv)
  flags.DEFINE_string("candidate", "configs/cifar10_fast.flags",
                      "The config timed against it.", flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, each trained with both "
                    "configs.", flag_values=fv)
  flags.DEFINE_string("work_dir", None,
                      "Where the runs and their logs go (<config>_s<seed>); "
                      "none of them may exist yet (default: a new folder).",
                      flag_values=fv)
  cli.define_json_out(fv, "Also write every number here (JSON).")


def _name(flagfile: str) -> str:
  return os.path.splitext(os.path.basename(flagfile))[0]


def run_name(flagfile: str, seed: int) -> str:
  """The run directory's (and its log's) name in the work folder."""
  return f"{_name(flagfile)}_s{seed}"


def train_once(flagfile: str, seed: int, work_dir: str,
               train_args: list[str]) -> dict:
  """Trains one config with one seed in a fresh process.

  Returns:
    ``{"config", "seed", "model_dir", "training_seconds",
    "process_seconds", "test_accuracy"}``.

  Raises:
    RuntimeError: if the run fails (its log's last line says why) or did
      not evaluate the test set.
  """
  name = run_name(flagfile, seed)
  model_dir = os.path.join(work_dir, name)
  metrics_path = os.path.join(model_dir, "metrics.json")
  log_path = os.path.join(work_dir, f"{name}.log")
  command = [sys.executable, os.path.join(SCRIPTS, "train_loop.py"),
             f"--flagfile={flagfile}", *train_args, f"--seed={seed}",
             "--noexport", f"--model_dir={model_dir}"]
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
  process_seconds = time.perf_counter() - start
  if status != 0:
    with open(log_path, encoding="utf-8") as log:
      lines = log.read().strip().splitlines() or ["(no output)"]
    raise RuntimeError(f"{name} exited {status}: {lines[-1]} (log: "
                       f"{log_path})")
  with open(metrics_path, encoding="utf-8") as f:
    metrics = json.load(f)
  test = metrics["evaluations"].get("test")
  if test is None:
    raise RuntimeError(f"{name} did not evaluate the test set: both configs "
                       f"need test among their (final) evaluation sets")
  return {"config": flagfile, "seed": seed, "model_dir": model_dir,
          "training_seconds": metrics["wall_seconds"],
          "process_seconds": process_seconds,
          "test_accuracy": test["accuracy"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
  return (statistics.mean(values),
          statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], baseline: str, candidate: str) -> dict:
  """Each config's mean +- std of training seconds and test accuracy, and
  the ratio of the mean training seconds (candidate / baseline)."""
  summary = {}
  for config in (baseline, candidate):
    own = [r for r in runs if r["config"] == config]
    summary[config] = {
        "training_seconds": _mean_std([r["training_seconds"] for r in own]),
        "test_accuracy": _mean_std([r["test_accuracy"] for r in own])}
  summary["ratio"] = (summary[candidate]["training_seconds"][0] /
                      summary[baseline]["training_seconds"][0])
  return summary


def run(fv: flags.FlagValues, args: list[str]) -> None:
  """Trains, compares and prints as the parsed flags ``fv`` say.

  Args:
    fv: This script's parsed flags.
    args: The arguments after ``--``: train_loop.py flags for every run.
  """
  train_args = list(args)
  baseline, candidate = (os.path.abspath(fv.baseline),
                         os.path.abspath(fv.candidate))
  for flagfile in (baseline, candidate):
    if not os.path.isfile(flagfile):
      cli.exit_with_error(f"{flagfile} not found: --baseline and --candidate "
                          f"take flagfiles (e.g. configs/cifar10.flags)")
  if _name(baseline) == _name(candidate):
    cli.exit_with_error("--baseline and --candidate need flagfiles of "
                        "different names (their runs are named after them)")
  try:
    seeds = [int(s) for s in fv.seeds]
  except ValueError:
    cli.exit_with_error(f"--seeds takes integers, got {fv.seeds}")
  if not seeds or len(set(seeds)) != len(seeds):
    cli.exit_with_error(f"--seeds needs distinct seeds, at least one; got "
                        f"{fv.seeds}")
  if fv.work_dir:
    work_dir = os.path.abspath(fv.work_dir)
    taken = [run_name(f, seed) for seed in seeds for f in (baseline, candidate)
             if os.path.exists(os.path.join(work_dir, run_name(f, seed)))]
    if taken:
      cli.exit_with_error(f"{work_dir} already holds {', '.join(taken)}: "
                          f"pass a new --work_dir (or none, for a fresh "
                          f"folder), or delete them")
    os.makedirs(work_dir, exist_ok=True)
  else:
    work_dir = tempfile.mkdtemp(prefix="time_to_accuracy-")
  print(f"runs and logs: {work_dir}", flush=True)
  runs = []
  print("| config | seed | training s | process s | test accuracy |")
  print("| --- | --- | --- | --- | --- |")
  for seed in seeds:
    for flagfile in (baseline, candidate):
      try:
        result = train_once(flagfile, seed, work_dir, train_args)
      except RuntimeError as e:
        cli.exit_with_error(str(e), status=1)
      runs.append(result)
      print(f"| {_name(flagfile)} | {seed} | "
            f"{result['training_seconds']:.1f} | "
            f"{result['process_seconds']:.1f} | "
            f"{result['test_accuracy']:.4f} |", flush=True)
  summary = summarize(runs, baseline, candidate)
  print()
  for config in (baseline, candidate):
    seconds, accuracy = (summary[config]["training_seconds"],
                         summary[config]["test_accuracy"])
    print(f"{_name(config)}: training {seconds[0]:.1f} +- {seconds[1]:.1f} s, "
          f"test accuracy {accuracy[0]:.4f} +- {accuracy[1]:.4f} "
          f"({len(seeds)} seeds)")
  print(f"ratio of training seconds, {_name(candidate)} / "
        f"{_name(baseline)}: {summary['ratio']:.3f}")
  if fv.json_out:
    cli.write_json_or_exit(fv.json_out, {"runs": runs, "summary": summary,
                                         "train_args": train_args})


def main(argv):
  run(FLAGS, argv[1:])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
