"""Shared test helpers: running the real scripts, writing tiny datasets."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
sys.path.insert(0, REPO)


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
  import tensorflow as tf
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


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads every scalar in ``event_dir`` with TensorBoard's own reader.

  Returns ``{tag: [(step, value), ...]}`` in file order.
  """
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      event_dir, size_guidance={event_accumulator.TENSORS: 0,
                                event_accumulator.SCALARS: 0})
  acc.Reload()
  import tensorflow as tf
  out = {}
  for tag in acc.Tags()["tensors"]:
    if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
      continue  # Histograms, images, hparams.
    out[tag] = [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                for e in acc.Tensors(tag)]
  for tag in acc.Tags()["scalars"]:
    out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
  return out
