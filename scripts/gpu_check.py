#!/usr/bin/env python3
"""Checks this machine's GPUs with the project's own commands.

  python scripts/gpu_check.py          # or: make gpu-check

For someone who has just installed ``.[gpu]``: prints the GPUs, driver,
CUDA, cuDNN and NCCL versions TensorFlow sees, then runs the project's real
commands, each in its own process and bounded in time, and prints a
pass/fail table: the smoke config on one GPU (auto XLA), MirroredStrategy
over all GPUs, mixed_float16 and (compute capability >= 8.0)
mixed_bfloat16, the equivalence tool on one GPU and on all of them, two
local workers with one GPU each, and a short benchmark. About 5 minutes on
one GPU. On a machine without GPUs it says so, runs the smoke config on the
CPU, and exits 0 if that passes. Exit status 1 if any check fails.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)

FLAGS = flags.FLAGS
SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_integer("timeout_seconds", 300, "Time allowed to each check.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("work_dir", None,
                      "Where the checks' runs go (default: a new temporary "
                      "folder).", flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Check:
  """One command of the table: its name and its arguments."""
  name: str
  command: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What a check gave: ``PASS``, ``FAIL`` or ``TIMEOUT``, its seconds,
  and the last line it printed (the error, when it failed)."""
  check: Check
  result: str
  seconds: float
  detail: str


def _script(name: str, *args: str) -> tuple[str, ...]:
  return (sys.executable, os.path.join(SCRIPTS, name), *args)


def environment() -> tuple[list[str], list[dict]]:
  """What TensorFlow sees, as report lines, and the GPUs' details.

  Only lists devices: no GPU memory is taken here, so that the checks'
  processes have the GPUs to themselves.
  """
  import tensorflow as tf
  build = tf.sysconfig.get_build_info()
  gpus = []
  for device in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(device)
    gpus.append({"name": details.get("device_name", device.name),
                 "compute_capability": details.get("compute_capability")})
  lines = [f"TensorFlow {tf.__version__} (built with CUDA "
           f"{build.get('cuda_version', 'none')}, cuDNN "
           f"{build.get('cudnn_version', 'none')})",
           f"NCCL: {_package_version('nvidia-nccl-cu12')}",
           f"driver: {_driver_version()}"]
  lines += [f"GPU {i}: {g['name']}, compute capability "
            f"{g['compute_capability']}" for i, g in enumerate(gpus)]
  return lines, gpus


def _package_version(name: str) -> str:
  from importlib import metadata
  try:
    return f"{metadata.version(name)} ({name})"
  except metadata.PackageNotFoundError:
    return "not installed"


def _driver_version() -> str:
  try:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return "no NVIDIA driver found (nvidia-smi)"
  return out.strip().splitlines()[0] if out.strip() else "unknown"


def checks_for(gpus: list[dict], work_dir: str) -> list[Check]:
  """The checks this machine can run (CPU ones only without a GPU)."""
  smoke = ("--flagfile=configs/smoke.flags", "--noexport")

  def run(name, *args):
    return _script("train_loop.py", *smoke, *args,
                   f"--model_dir={os.path.join(work_dir, name)}")

  if not gpus:
    return [Check("smoke config on the CPU", run("cpu", "--epochs=1"))]
  n = len(gpus)
  out = [
      Check("smoke config, one GPU (auto XLA)",
            run("one_gpu", "--strategy=one_device")),
      Check(f"MirroredStrategy over {n} GPU(s)",
            run("mirrored", "--strategy=mirrored",
                "--per_replica_batch_size=32")),
      Check("mixed_float16, one GPU",
            run("float16", "--strategy=one_device",
                "--mixed_precision=mixed_float16")),
  ]
  if all(_at_least(g["compute_capability"], (8, 0)) for g in gpus):
    out.append(Check("mixed_bfloat16, one GPU",
                     run("bfloat16", "--strategy=one_device",
                         "--mixed_precision=mixed_bfloat16")))
  out.append(Check("equivalence with fit, one GPU",
                   _script("verify_equivalence.py", "--replicas=1")))
  if n > 1:
    out.append(Check(f"equivalence with fit, {n} GPUs (same strategy)",
                     _script("verify_equivalence.py", f"--fit_replicas={n}",
                             f"--batch_size={32 * n}")))
    out.append(Check("two local workers, one GPU each",
                     _script("launch_local.py", "--num_workers=2", "--",
                             *smoke, "--model_dir=" +
                             os.path.join(work_dir, "workers"))))
  out.append(Check("benchmark, loop vs fit at batch 256",
                   _script("benchmark.py", "--batch_sizes=256",
                           "--xla_batch_sizes=256", "--windows=2",
                           "--window_examples=5120",
                           "--synthetic_train_size=10240")))
  return out


def _at_least(capability, minimum) -> bool:
  return capability is not None and tuple(capability) >= minimum


def run_checks(checks: list[Check], *, timeout_seconds: float,
               log=print) -> list[Outcome]:
  """Runs each check in its own process, one after the other.

  Returns:
    One outcome a check; a check that outlives ``timeout_seconds`` is
    killed and reported as ``TIMEOUT``.
  """
  outcomes = []
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  for check in checks:
    log(f"running: {check.name}")
    start = time.time()
    try:
      proc = subprocess.run(check.command, cwd=os.path.dirname(SCRIPTS),
                            env=env, capture_output=True, text=True,
                            timeout=timeout_seconds)
      result = "PASS" if proc.returncode == 0 else "FAIL"
      lines = (proc.stderr if proc.returncode else proc.stdout).strip()
      detail = lines.splitlines()[-1] if lines else ""
      if result == "FAIL":
        detail = f"exit {proc.returncode}: {detail}"
    except subprocess.TimeoutExpired:
      result, detail = "TIMEOUT", f"killed after {timeout_seconds:.0f}s"
    outcomes.append(Outcome(check, result, time.time() - start,
                            detail[:160]))
  return outcomes


def table(outcomes: list[Outcome]) -> str:
  """The outcomes as a markdown table."""
  rows = ["| check | result | seconds | last line |", "| --- | --- | --- | --- |"]
  rows += [f"| {o.check.name} | {o.result} | {o.seconds:.0f} | "
           f"{o.detail.replace('|', '/')} |" for o in outcomes]
  return "\n".join(rows)


def run(fv: flags.FlagValues, args: list[str]) -> None:
  """Reports the environment, runs the checks and prints the table; exits
  1 if any check did not pass.

  Args:
    fv: This script's parsed flags.
    args: The arguments that are not flags (there must be none).
  """
  cli.refuse_arguments(args)
  lines, gpus = environment()
  for line in lines:
    print(line, flush=True)
  if not gpus:
    print("no GPU visible to TensorFlow: the GPU checks are skipped; "
          "running the CPU check only", flush=True)
  work_dir = fv.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
  outcomes = run_checks(checks_for(gpus, work_dir),
                        timeout_seconds=fv.timeout_seconds,
                        log=lambda line: print(line, flush=True))
  print(table(outcomes), flush=True)
  failed = [o for o in outcomes if o.result != "PASS"]
  if failed:
    cli.exit_with_error(f"{len(failed)} of {len(outcomes)} checks did not "
                        f"pass: {', '.join(o.check.name for o in failed)}",
                        status=1)
  print(f"all {len(outcomes)} checks passed (runs in {work_dir})")


def main(argv):
  run(FLAGS, argv[1:])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
