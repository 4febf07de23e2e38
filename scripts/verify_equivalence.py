#!/usr/bin/env python3
"""Proves the custom loop equals model.fit, step by step.

  python scripts/verify_equivalence.py --replicas=2 [--fit_replicas=2] \
      [--dataset=folder --data_dir=...] [--steps=200] [--json_out=report.json]

Prints the first and worst steps, then a summary ending in PASS or FAIL; exits
0 only on PASS.
"""

from __future__ import annotations

import dataclasses
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
  cli.define_data_flags(fv, default_dataset="synthetic",
                        synthetic_train_size=2048, synthetic_test_size=512)
  flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("steps", None,
                       "Training steps (default: one epoch of the data).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("replicas", 1,
                       "Replicas of the loop's MirroredStrategy (logical CPUs "
                       "without enough GPUs).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("fit_replicas", 1,
                       "Run fit under a strategy with this many replicas; "
                       "the loop then uses the same strategy unless "
                       "--replicas says otherwise.", lower_bound=1,
                       flag_values=fv)
  # fit trains the model's Sequential twin (or a second instance) from the
  # same weights.
  cli.define_model_flags(fv, l2_help="Kernel L2 regularization on both "
                         "models.")
  flags.DEFINE_bool("keep_short_batch", False,
                    "Keep each epoch's last short batch.", flag_values=fv)
  flags.DEFINE_integer("steps_per_loop", 50,
                       "The loop's steps per tf.function call.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("jit_compile", False, "XLA on both sides.",
                    flag_values=fv)
  flags.DEFINE_enum("optimizer", "adam", options.OPTIMIZERS,
                    "Optimizer on both sides.", flag_values=fv)
  flags.DEFINE_enum("lr_schedule", "constant", options.LR_SCHEDULES,
                    "Learning-rate schedule over --steps on both sides.",
                    flag_values=fv)
  flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps.",
                       flag_values=fv)
  flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.",
                     flag_values=fv)
  flags.DEFINE_float("learning_rate", 0.001, "Base learning rate.",
                     flag_values=fv)
  cli.register_config_validators(fv, "optimizer")
  flags.DEFINE_integer("seed", 0, "Seed of initialization and data order.",
                       flag_values=fv)
  flags.DEFINE_enum("dtype", "auto",
                    ["auto", "float64"] + list(options.PRECISIONS),
                    "Precision of both models; auto: float64 when --replicas "
                    "and --fit_replicas differ (float32 rounding is then "
                    "amplified chaotically, see README), float32 otherwise; "
                    "mixed_float16/mixed_bfloat16 check mixed precision.",
                    flag_values=fv)
  flags.DEFINE_bool("noise_floor", False,
                    "Also train one-device fit against itself with one "
                    "initial weight moved by one ulp, to show what rounding "
                    "alone does over the run.", flag_values=fv)
  flags.DEFINE_bool("onednn", False,
                    "Keep oneDNN's graph rewrites on. They fuse ops "
                    "differently inside the loop's multi-step while loop than "
                    "in fit's single step, so kernels (not the algorithm) "
                    "differ in the last bit.", flag_values=fv)
  cli.define_json_out(fv, "Also write the full report here (JSON).")
  flags.DEFINE_enum("inject_fault", "none", options.FAULTS,
                    "A deliberate bug in the loop, to show the check fails.",
                    flag_values=fv)
  flags.DEFINE_integer("fault_step", 0,
                       "First step at which --inject_fault acts.",
                       lower_bound=0, flag_values=fv)


def run(fv: flags.FlagValues, argv: list[str]) -> int:
  """Compares as the parsed flags ``fv`` say.

  Args:
    fv: This script's parsed flags.
    argv: The command line (unused: the flags say everything).

  Returns:
    0 on PASS, 1 on FAIL; exits 2 with one error line on bad input (also
    when TensorFlow was loaded before with the other oneDNN setting, which
    must be chosen before it loads).
  """
  del argv
  replicas = fv.replicas
  if fv.fit_replicas > 1 and not fv["replicas"].present:
    replicas = fv.fit_replicas
  need = max(replicas, fv.fit_replicas)
  # Must be decided before TensorFlow loads.
  onednn = "1" if fv.onednn else "0"
  if ("tensorflow" in sys.modules and
      os.environ.get("TF_ENABLE_ONEDNN_OPTS") != onednn):
    cli.exit_with_error("TensorFlow is loaded with the other oneDNN setting; "
                        "run the verifier in a fresh process")
  os.environ["TF_ENABLE_ONEDNN_OPTS"] = onednn
  import tensorflow as tf
  from research import config as config_lib
  from research import data as data_lib
  from research import distribute
  from research import equivalence
  try:
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < need:
      distribute.configure_devices(cpu_replicas=need)
    kind = "GPU" if len(gpus) >= need else "CPU"
    if fv.jit_compile:
      distribute.refuse_xla_over_cpus(kind, need)
    devices = [d.name for d in tf.config.list_logical_devices(kind)]
    if not fv.jit_compile:
      # TensorFlow refuses XLA's MaxPool gradient under op determinism; XLA
      # on CPU is deterministic by itself.
      tf.config.experimental.enable_op_determinism()
    for r in (replicas, fv.fit_replicas):
      if fv.batch_size % r:
        raise UserError(f"--batch_size={fv.batch_size} does not divide "
                        f"over {r} replicas")
    flat = fv.flag_values_dict()
    data = data_lib.load(config_lib.part_from_flat("data", flat),
                         seed=fv.seed)
    config = equivalence.EquivalenceConfig(
        global_batch_size=fv.batch_size, steps=fv.steps,
        replicas=replicas, fit_replicas=fv.fit_replicas,
        model=config_lib.part_from_flat("model", flat),
        optimizer=config_lib.part_from_flat("optimizer", flat),
        keep_short_batch=fv.keep_short_batch,
        steps_per_loop=fv.steps_per_loop, jit_compile=fv.jit_compile,
        seed=fv.seed,
        dtype=(equivalence.default_dtype(replicas, fv.fit_replicas)
               if fv.dtype == "auto" else fv.dtype),
        noise_floor=fv.noise_floor, fault=fv.inject_fault,
        fault_step=fv.fault_step)
    print(f"loop: {replicas} replica(s), fit: {fv.fit_replicas} "
          f"replica(s) on {kind}; dataset {fv.dataset}, batch "
          f"{fv.batch_size}, {config.dtype}, oneDNN "
          f"{'on' if fv.onednn else 'off'}", flush=True)
    report = equivalence.run(config, data, devices)
  except UserError as e:
    cli.exit_with_error(str(e))
  except ValueError as e:  # An impossible configuration.
    cli.exit_with_error(f"{e}; check the flags")
  print(equivalence.format_report(report), flush=True)
  if fv.json_out:
    payload = report.to_json()
    payload["config"] = dataclasses.asdict(config)
    payload["dataset"] = {"name": fv.dataset, "data_dir": fv.data_dir,
                          "train_examples": len(data.train_labels),
                          "test_examples": len(data.test_labels)}
    cli.write_json_or_exit(fv.json_out, payload)
  return 0 if report.passed else 1


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return run(FLAGS, argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
