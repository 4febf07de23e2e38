"""SavedModel export of a trained run, scripts/export.py and scripts/predict.py.

Every loader a deployment uses is checked on one export in
test_serving_loaders.py; here the exports come from training and from
scripts/export.py.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_in_process, train_in_process
from test_serving_loaders import saved_model_cli_run
from research import data as data_lib
from research import export as export_lib

# The export and predict scripts, fresh interpreters.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A short run that exports at its end, and the test images.

  A ResNet-8 with dropout: the export must hold batch norm's moving
  statistics and run it, and dropout, in inference mode (the ConvNet's
  export: test_serving_loaders.py).
  """
  model_dir = str(tmp_path_factory.mktemp("run"))
  data = data_lib.make_synthetic(num_train=256, num_test=64, seed=3)
  train_in_process(model_dir, data, epochs=2, global_batch_size=32,
                   steps_per_loop=8, checkpoint_every_steps=8, seed=3,
                   model="resnet", resnet_depth=8, dropout=0.2)
  return model_dir, data


def _in_process_probabilities(model_dir, images, checkpoint=None):
  model, _, _ = export_lib.load_model_from_run(model_dir, checkpoint)
  return tf.nn.softmax(model(data_lib.to_float(images))).numpy()


def test_training_exports_a_model_that_loads_without_this_package(
    trained_run, tmp_path):
  model_dir, data = trained_run
  export_dir = os.path.join(model_dir, "export")
  images = data.test_images[:20]
  # Loaded as a serving system would (a fresh interpreter without this
  # package: tests/test_serving_loaders.py; here the export of a run).
  loaded = tf.saved_model.load(export_dir)
  out = {k: v.numpy() for k, v in loaded.signatures["serving_default"](
      images=tf.constant(images)).items()}
  out["class_names"] = [n.decode() for n in loaded.class_names.numpy()]
  expected = _in_process_probabilities(model_dir, images)
  np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5,
                             atol=1e-6)
  # Batch norm in training mode (or dropout on) would give other numbers.
  model, _, _ = export_lib.load_model_from_run(model_dir)
  in_training_mode = tf.nn.softmax(
      model(data_lib.to_float(images), training=True)).numpy()
  assert np.abs(in_training_mode - expected).max() > 1e-3
  np.testing.assert_array_equal(out["top_class"], expected.argmax(axis=1))
  assert out["probabilities"].shape == (20, 10)
  assert list(out["class_names"]) == list(data.class_names)
  assert not [p for p in os.listdir(model_dir) if p.startswith(".export")]
  # TensorFlow Serving's graph loader too, on the model trained under a
  # strategy (the export copies it into a fresh one).
  served = saved_model_cli_run(tmp_path, export_dir, "serving_default",
                               images=images)
  np.testing.assert_allclose(served["probabilities"], expected, rtol=1e-5,
                             atol=1e-6)


def test_export_script_exports_any_checkpoint(trained_run, tmp_path):
  model_dir, data = trained_run
  checkpoint = os.path.join(model_dir, "checkpoints", "ckpt-8")
  export_dir = str(tmp_path / "from_ckpt8")
  proc = run_in_process("export.py", f"--model_dir={model_dir}",
                        f"--checkpoint={checkpoint}",
                        f"--export_dir={export_dir}")
  assert proc.returncode == 0, proc.stderr
  assert f"exported {checkpoint} to {export_dir}" in proc.stdout
  images = data.test_images[:16]
  # Which weights it holds (loading without this package: the test above).
  serve = tf.saved_model.load(export_dir).signatures["serving_default"]
  out = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
  at_8 = _in_process_probabilities(model_dir, images, checkpoint)
  at_end = _in_process_probabilities(model_dir, images)
  np.testing.assert_allclose(out["probabilities"], at_8, rtol=1e-5,
                             atol=1e-6)
  assert np.abs(at_8 - at_end).max() > 1e-4  # A different checkpoint.


def test_export_script_errors_are_one_line(tmp_path):
  # In this process: test_readers.py runs export.py's errors in real ones.
  proc = run_in_process("export.py", f"--model_dir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp_path}/model.json not found")
  assert "Traceback" not in proc.stderr


def test_predict_prints_top_k_per_image_and_rejects_bad_paths(
    trained_run, tmp_path):
  model_dir, data = trained_run
  export_dir = os.path.join(model_dir, "export")
  paths = []
  for i in range(3):
    path = str(tmp_path / f"image{i}.png")
    tf.io.write_file(path, tf.io.encode_png(data.test_images[i]))
    paths.append(path)
  # A bigger JPEG is resized to the model's 32x32.
  big = tf.image.resize(data.test_images[3:4], [64, 48])[0]
  jpeg = str(tmp_path / "big.jpg")
  tf.io.write_file(jpeg, tf.io.encode_jpeg(tf.cast(big, tf.uint8)))
  # In this process: test_serving_loaders.py runs predict.py in a real one.
  proc = run_in_process("predict.py", f"--export_dir={export_dir}",
                        "--top_k=2", *paths, jpeg)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4
  expected = _in_process_probabilities(model_dir, data.test_images[:3])
  for path, line, p in zip(paths, lines, expected):
    name, rest = line.split(": ", 1)
    assert name == path
    first, second = rest.split(", ")
    top = p.argsort()[::-1]
    assert first.split() == [data.class_names[top[0]], f"{p[top[0]]:.3f}"]
    assert second.split()[0] == data.class_names[top[1]]
  assert lines[3].startswith(f"{jpeg}: ")

  missing = run_in_process("predict.py", f"--export_dir={export_dir}",
                           paths[0], str(tmp_path / "nope.jpg"))
  assert missing.returncode == 2 and missing.stdout == ""
  assert missing.stderr.strip().splitlines()[-1] == (
      f"error: image file not found: {tmp_path}/nope.jpg")
  not_image = tmp_path / "notes.txt"
  not_image.write_text("not an image")
  bad = run_in_process("predict.py", f"--export_dir={export_dir}",
                       str(not_image))
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      f"error: cannot decode {not_image} as an image (JPEG, PNG, GIF or BMP)")
  no_model = run_in_process("predict.py", f"--export_dir={tmp_path}",
                            paths[0])
  assert no_model.returncode == 2 and "holds no SavedModel" in no_model.stderr
