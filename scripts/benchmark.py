#!/usr/bin/env python3
"""Training throughput of our loop against model.fit, side by side.

  python scripts/benchmark.py [--dataset=folder --data_dir=/tmp/cifar10-jpeg] \
      [--json_out=bench.json]

For each batch size without XLA (and a few with XLA), times in alternating
windows (after a warm-up window each):
  loop            our loop on the real input pipeline
  loop_synthetic  our loop on one in-memory batch (the input-free ceiling)
  fit_default     model.fit at its defaults (steps_per_execution=1,
                  jit_compile="auto", which is off on CPU)
  fit_matched     model.fit with steps_per_execution and jit_compile as ours
and measures a 4096² float32 matmul (--matmul_size) as the machine's
ceiling. Prints a
markdown table; --json_out keeps every window.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
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
                        synthetic_train_size=50000, synthetic_test_size=16)
  cli.define_model_flags(fv, l2_help="Kernel L2 regularization factor.")
  flags.DEFINE_list("batch_sizes", ["32", "256", "1024"],
                    "Global batch sizes timed without XLA.", flag_values=fv)
  flags.DEFINE_list("xla_batch_sizes", ["32", "256"],
                    "Global batch sizes timed with XLA (jit_compile).",
                    flag_values=fv)
  flags.DEFINE_integer("windows", 5, "Timed windows per contender.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("window_examples", 6400,
                       "Examples per timed window (about).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("steps_per_loop", 100,
                       "Our steps per call (and fit's matched "
                       "steps_per_execution); capped at a window's steps.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("matmul_size", 4096,
                       "Side of the square matmul timed (in each precision's "
                       "compute dtype) as the machine's ceiling.",
                       lower_bound=64, flag_values=fv)
  flags.DEFINE_list("precisions", ["float32"],
                    "Keras dtype policies to time, among "
                    f"{','.join(options.PRECISIONS)} (mixed_float16 only "
                    "pays on a GPU).", flag_values=fv)
  flags.DEFINE_bool("compare_fused_batch_norm", False,
                    "Also time the loop with --fused_batch_norm toggled "
                    "(batch norm on TensorFlow's fused kernel, or not), "
                    "alternated with the other contenders.", flag_values=fv)
  cli.define_json_out(fv, "Also write every window here (JSON).")


def _batch_size(text: str) -> int:
  """A --batch_sizes entry as a positive int.

  Raises:
    UserError: for anything else.
  """
  try:
    batch = int(text)
  except ValueError:
    batch = 0
  if batch < 1:
    raise UserError(f"--batch_sizes/--xla_batch_sizes: {text!r} is not a "
                    f"positive batch size")
  return batch


def run(fv: flags.FlagValues, argv: list[str]) -> None:
  """Benchmarks as the parsed flags ``fv`` say; exits 2 on bad input.

  Args:
    fv: This script's parsed flags.
    argv: The command line (unused: the flags say everything).
  """
  del argv
  import tensorflow as tf
  from research import benchmarking
  from research import config as config_lib
  from research import data as data_lib
  from research import model as model_lib
  try:
    for precision in fv.precisions:
      if precision not in options.PRECISIONS:
        raise UserError(f"--precisions: {precision!r} is not one of "
                        f"{', '.join(options.PRECISIONS)}")
    settings = ([(_batch_size(b), False, p) for p in fv.precisions
                 for b in fv.batch_sizes] +
                [(_batch_size(b), True, p) for p in fv.precisions
                 for b in fv.xla_batch_sizes])
    flat = fv.flag_values_dict()
    data = data_lib.load(config_lib.part_from_flat("data", flat), seed=0)
    for batch, _, _ in settings:  # Refuses a batch larger than the data.
      data_lib.steps_per_epoch(len(data.train_labels), batch, True)
    model_config = config_lib.part_from_flat("model", flat)
    shapes = {"image_shape": data.image_shape,
              "num_classes": data.num_classes}
    flops = benchmarking.training_flops_per_example(
        model_lib.create(model_config, **shapes), data.image_shape)
  except (UserError, ValueError) as e:
    cli.exit_with_error(str(e))
  # Each precision's ceiling: the matmul in the dtype its layers compute in.
  ceilings = {p: benchmarking.matmul_gflops(
      fv.matmul_size, dtype=tf.bfloat16 if p == "mixed_bfloat16" else
      tf.float16 if p == "mixed_float16" else tf.float32)
              for p in fv.precisions}
  cpu = _cpu_model()
  print(f"machine: {cpu}, {os.cpu_count()} cores; TensorFlow "
        f"{tf.__version__}, Keras {tf.keras.__version__}", flush=True)
  model_name = model_config.name + (
      str(model_config.resnet_depth) if model_config.name == "resnet" else "")
  print(f"model: {model_name}; data: {fv.dataset} ({len(data.train_labels)} "
        f"training examples); {flops / 1e6:.2f} MFLOP per training example; "
        f"{fv.matmul_size}^2 matmul " + ", ".join(
            f"{p} {c:.0f}" for p, c in ceilings.items()) + " GFLOP/s",
        flush=True)

  results = []
  for batch, jit, precision in settings:
    window_steps = max(1, round(fv.window_examples / batch))
    steps_per_call = min(fv.steps_per_loop, window_steps)
    window_steps = max(steps_per_call,
                       window_steps // steps_per_call * steps_per_call)
    real = benchmarking.real_pipeline(data, batch)

    def loop(dataset, config):
      return benchmarking.LoopContender(
          dataset, global_batch_size=batch, steps_per_loop=steps_per_call,
          jit_compile=jit, precision=precision, model_config=config,
          **shapes).run
    contenders = {
        "loop": loop(real, model_config),
        "loop_synthetic": loop(
            benchmarking.synthetic_in_memory(batch, **shapes), model_config),
        "fit_default": benchmarking.FitContender(
            benchmarking.real_pipeline(data, batch), steps_per_execution=1,
            jit_compile="auto", precision=precision,
            model_config=model_config, **shapes).run,
        "fit_matched": benchmarking.FitContender(
            benchmarking.real_pipeline(data, batch),
            steps_per_execution=steps_per_call, jit_compile=jit,
            precision=precision, model_config=model_config, **shapes).run,
    }
    if fv.compare_fused_batch_norm:
      contenders["loop_other_batch_norm"] = loop(real, dataclasses.replace(
          model_config, fused_batch_norm=not model_config.fused_batch_norm))
    seconds = benchmarking.time_alternating(
        contenders, steps=window_steps, windows=fv.windows)
    rates = {name: [window_steps * batch / s for s in secs]
             for name, secs in seconds.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    row = {"batch_size": batch, "jit_compile": jit, "precision": precision,
           "matmul_gflops": ceilings[precision],
           "steps_per_loop": steps_per_call, "window_steps": window_steps,
           "examples_per_second": rates, "median": medians}
    results.append(row)
    print(f"{precision} batch {batch} xla {'on' if jit else 'off'} (steps "
          f"per call "
          f"{steps_per_call}): " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                  medians.items()) + " examples/s",
          flush=True)

  table = _markdown(results, flops)
  print(table)
  if fv.json_out:
    cli.write_json_or_exit(fv.json_out, {
        "machine": {"cpu": cpu, "cores": os.cpu_count(),
                    "tensorflow": tf.__version__,
                    "keras": tf.keras.__version__},
        "model": dataclasses.asdict(model_config), "dataset": fv.dataset,
        "flops_per_example": flops,
        "matmul_gflops": ceilings, "results": results, "table": table})


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  run(FLAGS, argv)


def _markdown(results, flops) -> str:
  lines = [
      "| precision | batch | XLA | loop ex/s | loop on synthetic ex/s "
      "| fit default ex/s | fit matched ex/s | loop ÷ fit default "
      "| loop ÷ fit matched | real ÷ synthetic "
      "| loop GFLOP/s (÷ its matmul) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    m = r["median"]
    gflops = m["loop"] * flops / 1e9
    ceiling = r["matmul_gflops"]
    lines.append(
        f"| {r['precision']} | {r['batch_size']} "
        f"| {'on' if r['jit_compile'] else 'off'} "
        f"| {m['loop']:,.0f} | {m['loop_synthetic']:,.0f} "
        f"| {m['fit_default']:,.0f} | {m['fit_matched']:,.0f} "
        f"| {m['loop'] / m['fit_default']:.2f} "
        f"| {m['loop'] / m['fit_matched']:.2f} "
        f"| {m['loop'] / m['loop_synthetic']:.2f} "
        f"| {gflops:.0f} ({gflops / ceiling:.2f}) |")
  if all("loop_other_batch_norm" in r["median"] for r in results):
    lines += ["", "| precision | batch | XLA | loop ex/s | loop, the other "
              "batch norm, ex/s | other ÷ loop |", "| --- " * 6 + "|"]
    for r in results:
      m = r["median"]
      lines.append(
          f"| {r['precision']} | {r['batch_size']} "
          f"| {'on' if r['jit_compile'] else 'off'} | {m['loop']:,.0f} "
          f"| {m['loop_other_batch_norm']:,.0f} "
          f"| {m['loop_other_batch_norm'] / m['loop']:.2f} |")
  return "\n".join(lines)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
