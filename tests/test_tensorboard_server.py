"""A real TensorBoard server reads a run's summaries back over HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import read_scalars, train_in_process
from research import data as data_lib

# A real TensorBoard process.
pytestmark = pytest.mark.slow

STARTUP_SECONDS = 90


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url, data=None):
  request = urllib.request.Request(url, data=data)
  if data is not None:
    request.add_header("Content-Type", "application/json")
  with urllib.request.urlopen(request, timeout=10) as response:
    return json.loads(response.read())


@pytest.fixture
def tensorboard(tmp_path):
  """Trains a tiny run, serves its folder, yields (base url, run dir)."""
  logdir = tmp_path / "logs"
  model_dir = str(logdir / "tiny")
  data = data_lib.make_synthetic(num_train=128, num_test=32, seed=0)
  train_in_process(model_dir, data, epochs=2, global_batch_size=32,
                   steps_per_loop=2, checkpoint_every_steps=0, export=False,
                   eval_images=4)
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
       "--host=127.0.0.1", f"--port={port}", "--load_fast=false",
       "--reload_interval=1"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
      assert proc.poll() is None, proc.stdout.read()[-3000:]
      try:
        if "tiny/train" in _get(f"{base}/data/plugin/scalars/tags"):
          break
      except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        pass
      assert time.monotonic() < deadline, "TensorBoard did not serve the run"
      time.sleep(0.5)
    yield base, model_dir
  finally:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout=20)


def test_tensorboard_serves_the_runs_scalars(tensorboard):
  base, model_dir = tensorboard
  tags = _get(f"{base}/data/plugin/scalars/tags")
  assert {"loss", "accuracy", "learning_rate", "grad_norm",
          "examples_per_second"} <= set(tags["tiny/train"])
  assert {"loss", "accuracy"} <= set(tags["tiny/test"])
  on_disk = read_scalars(os.path.join(model_dir, "train"))
  for tag in ("loss", "grad_norm"):
    query = urllib.parse.urlencode({"run": "tiny/train", "tag": tag})
    served = _get(f"{base}/data/plugin/scalars/scalars?{query}")
    # [wall_time, step, value] per point.
    assert [p[1] for p in served] == [s for s, _ in on_disk[tag]]
    np.testing.assert_allclose([p[2] for p in served],
                               [v for _, v in on_disk[tag]], rtol=1e-6)
  # The images and the HParams tab have the run too.
  images = _get(f"{base}/data/plugin/images/tags")
  assert {"predictions", "confusion_matrix"} <= set(images["tiny/test"])
  experiment = _get(f"{base}/data/plugin/hparams/experiment",
                    data=json.dumps({"experimentName": ""}).encode())
  names = {h["name"] for h in experiment["hparamInfos"]}
  assert {"learning_rate", "global_batch_size", "optimizer"} <= names
  [group] = _get(f"{base}/data/plugin/hparams/session_groups", data=json.dumps(
      {"experimentName": "", "startIndex": 0, "sliceSize": 10,
       "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS",
                           "STATUS_FAILURE", "STATUS_RUNNING"]}).encode()
                 )["sessionGroups"]
  assert group["name"] == "tiny"
  assert group["hparams"]["optimizer"] == "adam"
  assert group["hparams"]["global_batch_size"] == 32
  final = {(m["name"]["group"], m["name"]["tag"]): m["value"]
           for m in group["metricValues"]}
  with open(os.path.join(model_dir, "metrics.json")) as f:
    metrics = json.load(f)
  np.testing.assert_allclose(final[("test", "accuracy")],
                             metrics["eval_accuracy"], rtol=1e-6)
  np.testing.assert_allclose(final[("test", "loss")], metrics["eval_loss"],
                             rtol=1e-6)
