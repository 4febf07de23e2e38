#!/usr/bin/env python3
"""Evaluates checkpoints of a training run, apart from training.

  python scripts/evaluate.py --model_dir=logs/run --checkpoint=best \\
      --eval_sets=validation,test [--json_out=results.json]
  python scripts/evaluate.py --model_dir=logs/run --continuous [--timeout=600]

Rebuilds the run from its config.json (the same data and validation split,
the model in the same precision), restores the checkpoint (latest, best, or
a path) and prints one line per set; the numbers are those an evaluation in
the training loop gives for the same weights. It reads the run directory
and may run beside the trainer. With --continuous it is a sidecar: it
evaluates each new checkpoint of the running job once, writes the TensorBoard
runs evaluator/<set> and evaluator/evaluations.json, and stops after the
run's final checkpoint or --timeout seconds without a new one.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)
from research import options  # noqa: E402
from research.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("model_dir", None, "A training run's directory.",
                      flag_values=fv)
  flags.DEFINE_string("checkpoint", "latest",
                      "latest, best (the run's best/ checkpoint, with "
                      "--best_metric) or a checkpoint path prefix.",
                      flag_values=fv)
  flags.DEFINE_list("eval_sets", None,
                    "Sets to evaluate: "
                    f"{','.join(options.EVAL_SETS)} or one the dataset adds "
                    "(default, or given empty: every set "
                    "the run has).", flag_values=fv)
  cli.define_json_out(fv, "Also write the results here (JSON).")
  flags.DEFINE_bool("flip_average", None,
                    "Evaluate with (or, --noflip_average, without) test-time "
                    "flip averaging (default: as the run does).",
                    flag_values=fv)
  flags.DEFINE_integer("shift_average", None,
                       "Evaluate with test-time shift averaging by this many "
                       "pixels (0: none; default: as the run does).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_bool("continuous", False,
                    "Sidecar: evaluate each new checkpoint of the run as it "
                    "appears, until its final one.", flag_values=fv)
  flags.DEFINE_float("timeout", 3600.0,
                     "--continuous: stop after this many seconds without a "
                     "new checkpoint.", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_float("poll_seconds", 2.0,
                     "--continuous: seconds between looks for a new "
                     "checkpoint.", lower_bound=0.0, flag_values=fv)
  flags.mark_flag_as_required("model_dir", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> None:
  """Evaluates as the parsed flags ``fv`` say; exits 2 on user errors.

  Args:
    fv: This script's parsed flags.
    args: The arguments that are not flags (there must be none).
  """
  cli.refuse_arguments(args)
  from research import evaluation
  from research.files import write_json
  if fv.continuous and fv["checkpoint"].present:
    cli.exit_with_error("--continuous evaluates every checkpoint of the run; "
                        "drop --checkpoint, or --continuous")
  for name in ("flip_average", "shift_average"):
    if fv.continuous and fv[name].value is not None:
      cli.exit_with_error(f"--continuous evaluates as the run does; drop "
                          f"--{name}, or --continuous")
  try:
    if fv.continuous:
      records = evaluation.evaluate_continuously(
          fv.model_dir, eval_sets=fv.eval_sets, timeout=fv.timeout,
          poll_seconds=fv.poll_seconds, log=lambda line: print(line,
                                                               flush=True))
      if fv.json_out:
        write_json(fv.json_out, records)
      return
    results = evaluation.evaluate_run(fv.model_dir, checkpoint=fv.checkpoint,
                                      eval_sets=fv.eval_sets,
                                      flip_average=fv.flip_average,
                                      shift_average=fv.shift_average)
    if fv.json_out:
      write_json(fv.json_out, results)
  except UserError as e:
    cli.exit_with_error(str(e), status=e.exit_status)
  averages = [f"{results['shift_average']}-pixel shift averaging"
              ] if results["shift_average"] else []
  averages += ["flip averaging"] if results["flip_average"] else []
  print(f"checkpoint {results['checkpoint']} (step {results['step']})"
        f"{' with ' + ' and '.join(averages) if averages else ''}")
  for name, result in results["evaluations"].items():
    print(f"{name}: accuracy {result['accuracy']:.4f} "
          f"({result['correct']}/{result['count']}) loss "
          f"{result['loss']:.4f} nll {result['nll']:.4f} brier "
          f"{result['brier']:.4f} ece {result['ece']:.4f}")


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # absl's INFO is TF's noise.
  run(FLAGS, argv[1:])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
