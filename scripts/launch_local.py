#!/usr/bin/env python3
"""Runs a multi-worker job on this machine: N train_loop.py processes.

  python scripts/launch_local.py --num_workers=2 -- --flagfile=configs/smoke.flags \
      --model_dir=/tmp/mw

Each worker gets a TF_CONFIG naming every worker at a free 127.0.0.1 port and
its own index, and --strategy=multi_worker_mirrored. Their output lines are
prefixed with [worker i]. If a worker fails, the others are stopped and the
launcher exits non-zero, naming it. SIGTERM (or Ctrl-C) is passed on to every
worker, which saves a checkpoint and exits with status 143; so does the
launcher then.

With --evaluator, a sidecar evaluator runs beside them (scripts/evaluate.py
--continuous on the job's --model_dir, as the TF_CONFIG task "evaluator",
which is not part of the training cluster): it evaluates each checkpoint
the chief saves, and the launcher waits for it to finish after the workers
succeed (it stops after the final checkpoint), or stops it with them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)
from research import options  # noqa: E402  (no TensorFlow)

FLAGS = flags.FLAGS
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "train_loop.py")
EVALUATE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "evaluate.py")
# The statuses of workers that saved a checkpoint and stopped on SIGTERM or
# on Ctrl-C.
STOPPED_STATUSES = (options.PREEMPTED_EXIT_STATUS,
                    options.INTERRUPTED_EXIT_STATUS)


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_integer("num_workers", 2, "Worker processes to start.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_list("gpus", None,
                    "GPU ids to share out among the workers (default: "
                    "CUDA_VISIBLE_DEVICES if set, else those nvidia-smi -L "
                    "lists; none on a machine without GPUs).",
                    flag_values=fv)
  flags.DEFINE_integer("gpus_per_worker", None,
                       "GPUs each worker gets, through its own "
                       "CUDA_VISIBLE_DEVICES (default: 1 when there are GPUs,"
                       " 0 otherwise; 0 hides every GPU from the workers).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_bool("evaluator", False,
                    "Also run a sidecar evaluator (evaluate.py --continuous) "
                    "on the job's --model_dir.", flag_values=fv)
  flags.DEFINE_list("evaluator_flags", [],
                    "More evaluate.py flags for the sidecar, e.g. "
                    "--evaluator_flags=--eval_sets=validation,--timeout=600.",
                    flag_values=fv)
  flags.DEFINE_float("grace_seconds", 20.0,
                     "After a failure or SIGTERM, how long workers get to "
                     "exit before they are killed.", lower_bound=0,
                     flag_values=fv)


def free_ports(count: int) -> list[int]:
  """Ports on 127.0.0.1 that were free a moment ago."""
  sockets, ports = [], []
  for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
    ports.append(s.getsockname()[1])
  for s in sockets:
    s.close()
  return ports


def tf_config(ports: list[int], index: int, task_type: str = "worker"
              ) -> str:
  """The TF_CONFIG of task ``index`` of ``task_type`` (``worker``, or the
  ``evaluator``, which is no member of the cluster) in a local cluster."""
  return json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
      "task": {"type": task_type, "index": index}})


def model_dir_of(train_args: list[str]) -> str | None:
  """The ``--model_dir`` among ``train_loop.py``'s flags (the last one), or
  None."""
  found = None
  for i, arg in enumerate(train_args):
    if arg.startswith("--model_dir="):
      found = arg.split("=", 1)[1]
    elif arg == "--model_dir" and i + 1 < len(train_args):
      found = train_args[i + 1]
  return found


def _pump(name: str, stream, out) -> None:
  for line in stream:
    out.write(f"[{name}] {line}")
    out.flush()


def describe_status(code: int) -> str:
  """A worker's exit code as a message says it, e.g. ``status -9 (killed
  by SIGKILL)`` for a negative (signal) code, else ``status 1``."""
  if code < 0:
    return f"status {code} (killed by {signal.Signals(-code).name})"
  return f"status {code}"


def _stop(workers, sig, grace_seconds):
  for proc in workers:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        pass
  deadline = time.time() + grace_seconds
  for proc in workers:
    try:
      proc.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def host_gpus() -> list[str]:
  """The GPU ids the workers may use: ``CUDA_VISIBLE_DEVICES`` when set,
  else what ``nvidia-smi -L`` lists (none without a driver). No TensorFlow
  here: it would take the GPUs' memory in the launcher."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g.strip() for g in visible.split(",") if g.strip()]
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.splitlines())
          if line.startswith("GPU ")]


def worker_gpus(num_workers: int, gpus: list[str],
                gpus_per_worker: int | None) -> list[str]:
  """Each worker's ``CUDA_VISIBLE_DEVICES``: its own slice of ``gpus``.

  Two processes on one GPU would each try to take all of its memory, and
  replicas of one job would share a device; so each worker sees only its
  own GPUs, and none (``""``) when there are none to give.

  Args:
    num_workers: Workers on this host.
    gpus: GPU ids to share out.
    gpus_per_worker: GPUs a worker; None: 1 if there are GPUs, else 0.

  Returns:
    One comma-separated id list a worker (``""``: no GPU).

  Raises:
    ValueError: if there are not enough GPUs for that many a worker.
  """
  if gpus_per_worker is None:
    gpus_per_worker = 1 if gpus else 0
  needed = num_workers * gpus_per_worker
  if needed > len(gpus):
    raise ValueError(
        f"{num_workers} workers x {gpus_per_worker} GPUs need {needed} GPUs "
        f"but {len(gpus)} are available ({','.join(gpus) or 'none'}); "
        f"lower --num_workers or --gpus_per_worker, or pass --gpus")
  return [",".join(gpus[i * gpus_per_worker:(i + 1) * gpus_per_worker])
          for i in range(num_workers)]


def _start(name: str, command: list[str], env: dict) -> subprocess.Popen:
  """Starts a task in its own process group (killed with its children),
  relaying its output lines prefixed with ``[name]``."""
  proc = subprocess.Popen(
      [sys.executable, "-u", *command], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True)
  threading.Thread(target=_pump, args=(name, proc.stdout, sys.stdout),
                   daemon=True).start()
  return proc


def launch(num_workers: int, train_args: list[str], grace_seconds: float,
           gpus_each: list[str] | None = None,
           evaluator_args: list[str] | None = None) -> int:
  """Starts the workers, relays their output, and waits for them.

  Args:
    num_workers: Worker processes.
    train_args: ``train_loop.py``'s flags.
    grace_seconds: How long workers get to exit after a failure or signal.
    gpus_each: Each worker's ``CUDA_VISIBLE_DEVICES`` (``worker_gpus``);
      None leaves the environment's.
    evaluator_args: ``evaluate.py``'s flags to start a sidecar evaluator
      with (None: none). It sees no GPU when the workers were given GPUs.

  Returns:
    0 if every worker succeeded; 143 or 130 if they saved and stopped on
    SIGTERM or Ctrl-C (130 if any worker was interrupted); otherwise
    the failing worker's status (or 1 for a signal). The evaluator's status
    is reported, not returned.
  """
  ports = free_ports(num_workers)
  workers = []
  stop_signal = []

  def on_signal(signum, frame):
    del frame
    stop_signal.append(signum)

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  for i in range(num_workers):
    env = dict(os.environ, TF_CONFIG=tf_config(ports, i))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if gpus_each is not None:
      env["CUDA_VISIBLE_DEVICES"] = gpus_each[i]
    workers.append(_start(f"worker {i}", [
        TRAIN_SCRIPT, *train_args, "--strategy=multi_worker_mirrored"], env))
  gpus_shown = ("" if gpus_each is None else "; GPUs " + ", ".join(
      g or "none" for g in gpus_each))
  print(f"launched {num_workers} workers on 127.0.0.1 ports "
        f"{', '.join(map(str, ports))} (pids "
        f"{', '.join(str(p.pid) for p in workers)}){gpus_shown}", flush=True)
  evaluator = None
  if evaluator_args is not None:
    env = dict(os.environ, TF_CONFIG=tf_config(ports, 0, "evaluator"))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if gpus_each is not None and any(gpus_each):
      env["CUDA_VISIBLE_DEVICES"] = ""  # The workers' GPUs are theirs.
    evaluator = _start("evaluator", [EVALUATE_SCRIPT, "--continuous",
                                     *evaluator_args], env)
    print(f"launched a sidecar evaluator (pid {evaluator.pid})", flush=True)
  code = None
  try:
    code = _wait_for_workers(workers, stop_signal, grace_seconds)
  finally:
    if evaluator is not None:
      _finish_evaluator(evaluator, succeeded=code == 0,
                        grace_seconds=grace_seconds)
  return code


def _finish_evaluator(evaluator: subprocess.Popen, *, succeeded: bool,
                      grace_seconds: float) -> None:
  """Waits for the sidecar after a successful job (it stops by itself after
  the final checkpoint), else stops it; reports its status."""
  if not succeeded:
    _stop([evaluator], signal.SIGTERM, grace_seconds)
    return
  code = evaluator.wait()
  if code:
    sys.stderr.write(f"warning: the evaluator exited with "
                     f"{describe_status(code)}\n")


def _wait_for_workers(workers, stop_signal, grace_seconds) -> int:
  """Relays a stop signal to the workers and waits for them (``launch``'s
  return value)."""
  forwarded = False
  while True:
    if stop_signal and not forwarded:
      forwarded = True
      print("launcher: passing SIGTERM to every worker", flush=True)
      for proc in workers:
        if proc.poll() is None:
          os.killpg(proc.pid, signal.SIGTERM)
    codes = [proc.poll() for proc in workers]
    failed = [(i, c) for i, c in enumerate(codes)
              if c not in (None, 0, *STOPPED_STATUSES)]
    if failed:
      i, code = failed[0]
      sys.stderr.write(f"error: worker {i} exited with {describe_status(code)}"
                       f"; stopping the other workers\n")
      _stop(workers, signal.SIGTERM, grace_seconds)
      return code if code > 0 else 1
    if all(c is not None for c in codes):
      stopped = [c for c in codes if c in STOPPED_STATUSES]
      if stopped:
        print("launcher: workers saved a checkpoint and stopped; run the same "
              "command to resume", flush=True)
        return min(stopped)  # 130 (interrupted) over 143.
      return 0
    time.sleep(0.2)


def main(argv):
  train_args = argv[1:]
  if not train_args:
    cli.exit_with_error("give the train_loop.py flags after --, e.g. "
                        "-- --flagfile=configs/smoke.flags --model_dir=/tmp/mw")
  try:
    gpus_each = worker_gpus(FLAGS.num_workers, (FLAGS.gpus if FLAGS['gpus'].present
                                                else host_gpus()),
                            FLAGS.gpus_per_worker)
  except ValueError as e:
    cli.exit_with_error(str(e))
  evaluator_args = None
  if FLAGS.evaluator:
    model_dir = model_dir_of(train_args)
    if not model_dir:
      cli.exit_with_error("--evaluator needs the job's --model_dir among the "
                          "train_loop.py flags (after --)")
    evaluator_args = [f"--model_dir={model_dir}", *FLAGS.evaluator_flags]
  sys.exit(launch(FLAGS.num_workers, train_args, FLAGS.grace_seconds,
                  gpus_each, evaluator_args))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
