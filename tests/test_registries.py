"""The extension points: a model and a data source added by registration
alone (BUILD.md, "How to add a model" and "How to add a dataset"), trained,
checkpointed, resumed and exported without any edit to the library."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_scalars, train_in_process
from research import config as config_lib
from research import data as data_lib
from research import export as export_lib
from research import model as model_lib
from research.errors import UserError


# --- BUILD.md, "How to add a model" ----------------------------------------
class TinyMLP(tf.keras.Model):
  """Flatten, one hidden layer, logits."""

  def __init__(self, *, num_classes, hidden=16, dtype=None):
    super().__init__(name="tiny_mlp", dtype=dtype)
    self.flatten = tf.keras.layers.Flatten(dtype=dtype)
    self.hidden = tf.keras.layers.Dense(hidden, activation="relu",
                                        dtype=dtype)
    self.logits = tf.keras.layers.Dense(num_classes, dtype=dtype)

  def call(self, images, training=False):
    return self.logits(self.hidden(self.flatten(images)))


def tiny_mlp(config, *, num_classes, image_shape, dtype):
  return TinyMLP(num_classes=num_classes, dtype=dtype)
# ----------------------------------------------------------------------------


# --- BUILD.md, "How to add a dataset" --------------------------------------
def two_blobs(config, *, seed):
  """Two classes: dark and bright 8x8 images."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, 2, n).astype(np.int32)
    images = np.where(labels[:, None, None, None] == 1, 200, 40)
    images = images + rng.integers(-30, 30, (n, 8, 8, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels

  return data_lib.ArrayData(*split(config.synthetic_train_size),
                            *split(config.synthetic_test_size),
                            ("dark", "bright"))
# ----------------------------------------------------------------------------


@pytest.fixture
def registered():
  model_lib.register_model("tiny_mlp", tiny_mlp)
  data_lib.register_dataset("two_blobs", two_blobs)
  yield
  model_lib.MODELS.unregister("tiny_mlp")
  data_lib.DATASETS.unregister("two_blobs")


def _weights(model_dir):
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  return path, {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(path)
                if n.startswith("model/")}


def test_a_registered_model_and_source_train_resume_and_export(tmp_path,
                                                               registered):
  settings = dict(model="tiny_mlp", dataset="two_blobs",
                  synthetic_train_size=128, synthetic_test_size=32,
                  global_batch_size=16, steps_per_loop=4,
                  checkpoint_every_steps=4, learning_rate=0.01, seed=2,
                  deterministic=True)
  data = data_lib.load(config_lib.part_from_flat("data", settings), seed=2)
  assert data.image_shape == (8, 8, 3) and data.class_names == ("dark",
                                                                 "bright")

  # One run straight to 3 epochs, and one that stops after 1 and resumes.
  whole = train_in_process(tmp_path / "whole", data, epochs=3, **settings)
  train_in_process(tmp_path / "resumed", data, epochs=1, **settings)
  lines = []
  resumed = train_in_process(tmp_path / "resumed", data, epochs=3,
                             log=lines.append, **settings)
  assert "resumed from" in lines[0] and "at step 8/24" in lines[0]
  assert whole["global_step"] == resumed["global_step"] == 24
  assert whole["eval_loss"] < 0.5  # It learned: chance is ln 2 = 0.69.
  path_a, a = _weights(str(tmp_path / "whole"))
  path_b, b = _weights(str(tmp_path / "resumed"))
  assert os.path.basename(path_a) == os.path.basename(path_b) == "ckpt-24"
  assert any("hidden" in name for name in a)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  steps = [s for s, _ in read_scalars(str(tmp_path / "resumed" / "train"))[
      "loss"]]
  assert steps == list(range(4, 25, 4))

  # The run's files name the model; the export serves it.
  with open(tmp_path / "whole" / "config.json") as f:
    assert json.load(f)["model"] == {
        "name": "tiny_mlp", "l2": 0.0, "dropout": 0.0, "resnet_depth": 20,
        "sync_batch_norm": None, "fused_batch_norm": False,
        "flip_average": False, "shift_average": 0}
  loaded = tf.saved_model.load(str(tmp_path / "whole" / "export"))
  probabilities = loaded.signatures["serving_default"](
      images=tf.constant(data.test_images))["probabilities"].numpy()
  model, _, _ = export_lib.load_model_from_run(str(tmp_path / "whole"))
  expected = tf.nn.softmax(model(data_lib.to_float(data.test_images)))
  np.testing.assert_allclose(probabilities, expected.numpy(), rtol=1e-5,
                             atol=1e-6)


def test_unknown_names_list_the_registered_ones(registered):
  with pytest.raises(UserError, match=r"unknown --model='vgg'; choose one of "
                     r"convnet, resnet, tiny_mlp"):
    model_lib.create(config_lib.ModelConfig(name="vgg"), num_classes=2,
                     image_shape=(8, 8, 3))
  with pytest.raises(UserError, match=r"unknown --dataset='mnist'; choose one "
                     r"of cifar10, folder, synthetic, two_blobs"):
    data_lib.load(config_lib.DataConfig(dataset="mnist"))
  with pytest.raises(ValueError, match="already registered"):
    model_lib.register_model("tiny_mlp", tiny_mlp)
