"""Shared test helpers: running the real scripts (in a fresh process, or
in this one), writing tiny datasets.

The test process splits its CPU into two logical devices before TensorFlow
initializes, so in-process runs can mirror over two replicas
(``--cpu_replicas=2``) as a separate process would.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

# One thread per op, here and in every process the tests start (they
# inherit the environment): the suite runs two test processes and their
# children on two cores, and tiny test models gain nothing from splitting an
# op, while oversubscribed cores lose time to switching. Set before
# TensorFlow loads; equal in every process, so bitwise comparisons between
# processes compare like with like.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
sys.path.insert(0, REPO)
sys.path.insert(0, SCRIPTS)
# --cpu-report=FILE: each test's CPU seconds (tests/cpu_report.py).
pytest_plugins = ["cpu_report"]
# tests/equivalence_batch.py asks for more when a case needs them.
IN_PROCESS_CPU_REPLICAS = int(os.environ.get("RESEARCH_TEST_CPU_REPLICAS", 2))
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * IN_PROCESS_CPU_REPLICAS)


@pytest.fixture(autouse=True)
def _op_determinism_off_after_each_test():
  """A deterministic run turns op determinism on for the whole process;
  later tests (XLA ones) must not inherit it."""
  yield
  # Only the enabling half is public API.
  from tensorflow.python.framework import config as tf_config
  tf_config.disable_op_determinism()


def signal_script_at(line_prefix: str, args, sig: int, *,
                     timeout: float = 180) -> subprocess.CompletedProcess:
  """Starts ``scripts/train_loop.py args``, sends it ``sig`` as soon as it
  prints a line starting with ``line_prefix``, and waits for it to end.

  Returns:
    Its exit status (negative: killed by that signal), everything it
    printed on stdout, and its stderr; ``pid`` is set on the result.
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(
      [sys.executable, "-u", os.path.join(SCRIPTS, "train_loop.py"), *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith(line_prefix):
        proc.send_signal(sig)
        break
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                       "".join(seen) + out, err)
  result.pid = proc.pid
  return result


@contextlib.contextmanager
def _working_directory(path):
  # contextlib.chdir is Python >= 3.11; the project supports 3.10.
  previous = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(previous)


def run_in_process(name: str, *args: str) -> subprocess.CompletedProcess:
  """Runs ``scripts/<name>``'s ``run`` in this process, as its command line.

  Parses ``args`` into fresh flags (flagfiles relative to the repository)
  and calls ``run(flags, argv)`` with the command line, or ``run(flags,
  args)`` with the arguments that are not flags for a script whose ``run``
  takes those (predict.py, export.py). Returns what a process would: the exit status (from ``SystemExit``,
  0 without one) and what it wrote to stdout and stderr (log records
  included). An exception other than ``SystemExit`` propagates: in a real
  process it would have been a traceback.
  """
  from absl import flags
  import cli_common
  module = importlib.import_module(name.removesuffix(".py"))
  fv = flags.FlagValues()
  module.define_flags(fv)
  argv = [os.path.join("scripts", name), *args]
  stdout, stderr = io.StringIO(), io.StringIO()
  handler = logging.StreamHandler(stderr)
  logging.getLogger().addHandler(handler)
  status = 0
  try:
    with _working_directory(REPO), contextlib.redirect_stdout(stdout), \
        contextlib.redirect_stderr(stderr):
      positional = cli_common.parse_flags_or_exit(argv, fv)[1:]
      takes_args = "args" in inspect.signature(module.run).parameters
      module.run(fv, positional if takes_args else argv)
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else 1
  finally:
    logging.getLogger().removeHandler(handler)
  return subprocess.CompletedProcess(argv, status, stdout.getvalue(),
                                     stderr.getvalue())


def run_script(name: str, *args: str, timeout: float = 240,
               env: dict | None = None, check: bool = False
               ) -> subprocess.CompletedProcess:
  """Runs ``scripts/<name>`` with this interpreter; bounded in time."""
  full_env = dict(os.environ)
  full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  full_env.update(env or {})
  proc = subprocess.run(
      [sys.executable, os.path.join(SCRIPTS, name), *args], cwd=REPO,
      env=full_env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(
        f"{name} {' '.join(args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
  return proc


def run_equivalence_batch(folder, cases: dict) -> dict:
  """Runs equivalence comparisons in one fresh process
  (tests/equivalence_batch.py); returns each case's report by name.

  Args:
    folder: A scratch folder for the process's input and output.
    cases: Case name -> ``(data sizes, EquivalenceConfig fields)``, or
      ``{"script": [flags]}`` for a run of scripts/verify_equivalence.py
      (its report: ``returncode``, ``stdout``, ``report``).
  """
  import json
  with open(os.path.join(folder, "cases.json"), "w") as f:
    json.dump({name: case if isinstance(case, dict) else
               {"data": case[0], "config": case[1]}
               for name, case in cases.items()}, f)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "equivalence_batch.py"),
       os.path.join(folder, "cases.json"),
       os.path.join(folder, "reports.json")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(folder, "reports.json")) as f:
    return json.load(f)


def assert_equivalent(report: dict) -> None:
  """An equivalence report passed, within its mode's tolerances, with the
  same evaluation on both sides."""
  assert report["passed"], report["text"]
  tolerance = report["tolerance"]
  assert report["max_loss_diff"] <= tolerance["loss"]
  assert report["max_weight_diff"] <= tolerance["weight"]
  assert report["loop_eval"]["correct"] == report["fit_eval"]["correct"]


def assert_bitwise_equal_to_fit(report: dict) -> None:
  """Every step's loss and every weight exactly as ``fit``'s."""
  assert report["max_loss_diff"] == 0.0
  assert report["max_weight_diff"] == 0.0
  assert_equivalent(report)


def assert_loss_fell(losses, by: float = 0.03) -> None:
  """Training happened: the last five steps' mean loss is below the first
  five's by at least ``by`` (single losses are too noisy to compare)."""
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < first - by, (first, last, losses)


def write_cifar_batches(root: str, *, per_batch: int = 6, num_test: int = 8,
                        seed: int = 0) -> dict:
  """Writes a tiny official-layout ``cifar-10-batches-py`` under ``root``.

  Returns the arrays written: ``{"train": (images, labels), "test": ...}``
  with images in HWC uint8.
  """
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(folder, exist_ok=True)
  written = {"train": ([], []), "test": ([], [])}

  def write(name, n, split):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, n)]
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump({b"batch_label": name.encode(), b"labels": labels,
                   b"data": rows,
                   b"filenames": [f"{i}.png".encode() for i in range(n)]}, f,
                  protocol=2)
    written[split][0].append(images)
    written[split][1].append(np.array(labels, np.int32))

  for i in range(1, 6):
    write(f"data_batch_{i}", per_batch, "train")
  write("test_batch", num_test, "test")
  with open(os.path.join(folder, "batches.meta"), "wb") as f:
    pickle.dump({b"label_names": [n.encode() for n in (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
        "horse", "ship", "truck")], b"num_cases_per_batch": per_batch,
                 b"num_vis": 3072}, f, protocol=2)
  return {k: (np.concatenate(v[0]), np.concatenate(v[1]))
          for k, v in written.items()}


def write_image_folder(root: str, *, classes=("cat", "dog", "frog"),
                       per_class: int = 4, size: int = 32, seed: int = 0
                       ) -> str:
  """Writes ``train/<class>/`` and ``test/<class>/`` PNG and JPEG images."""
  rng = np.random.default_rng(seed)
  for split in ("train", "test"):
    for c in classes:
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for i in range(per_class):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if i % 2:
          tf.io.write_file(os.path.join(d, f"{i}.png"),
                           tf.io.encode_png(image))
        else:
          tf.io.write_file(os.path.join(d, f"{i}.jpg"),
                           tf.io.encode_jpeg(image, quality=95))
  return root


@pytest.fixture
def repo_root():
  return REPO


def convnet_training(strategy, *, total_steps=1, learning_rate=1e-3,
                     ema_decay=0.0, **step):
  """``training.build_training`` of the CIFAR-10 ConvNet (10 classes,
  32x32x3) under ``strategy``, with ``StepConfig(**step)``: ``(state,
  runner)``."""
  from research.config import ModelConfig, OptimizerConfig, StepConfig
  from research.training import build_training
  return build_training(
      strategy=strategy, model_config=ModelConfig(),
      optimizer_config=OptimizerConfig(learning_rate=learning_rate,
                                       ema_decay=ema_decay),
      step_config=StepConfig(**step), num_classes=10,
      image_shape=(32, 32, 3), total_steps=total_steps)


def train_in_process(model_dir, data, *, strategy=None, log=None, **flat):
  """``research.train.train`` with a config built from flat names (the flags'
  names, ``global_batch_size`` for the batch), on the default strategy."""
  from research import config as config_lib
  from research import train as train_lib
  config = config_lib.from_flat({"model_dir": str(model_dir), **flat})
  return train_lib.train(
      config, strategy=strategy or tf.distribute.get_strategy(), data=data,
      log=log or (lambda line: None))


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads every scalar in ``event_dir`` with TensorBoard's own reader.

  Returns ``{tag: [(step, value), ...]}`` in file order.
  """
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      event_dir, size_guidance={event_accumulator.TENSORS: 0,
                                event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
      continue  # Histograms, images, hparams.
    out[tag] = [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                for e in acc.Tensors(tag)]
  for tag in acc.Tags()["scalars"]:
    out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
  return out
