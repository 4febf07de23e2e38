"""The exponential moving average of the weights (--ema_decay, issue 16).

Kill-and-resume with an EMA is in test_fault_tolerance (its runs keep one);
a run's evaluations, evaluate.py's and the sidecar's numbers and its export
with an EMA are in test_sidecar_evaluator (its trained run keeps one).
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import convnet_training
from research import data as data_lib
from research import distribute
from research import export as export_lib
from research import optim
from research.config import ModelConfig

DECAY = 0.75


def _train_dataset(strategy, batch=16):
  data = data_lib.make_synthetic(num_train=64, num_test=32, seed=5)
  return data, strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(
          (data_lib.to_float(data.train_images), data.train_labels)
      ).batch(batch, drop_remainder=True).repeat())


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_average_follows_its_formula(replicas):
  # Keys of its own: another strategy of this test process may have
  # all-reduced tensors of other shapes (distribute.mirrored_strategy).
  strategy = (distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
              if replicas == 2 else tf.distribute.get_strategy())
  state, runner = convnet_training(strategy, total_steps=4, ema_decay=DECAY,
                                   learning_rate=0.01, global_batch_size=16)
  _, dataset = _train_dataset(strategy)
  iterator = iter(dataset)
  expected = None
  for _ in range(4):
    runner.train_steps(iterator, tf.constant(1))
    weights = [v.numpy().astype(np.float64)
               for v in state.model.trainable_variables]
    # Keras' rule: the first step's average is the weights themselves.
    expected = weights if expected is None else [
        DECAY * e + (1 - DECAY) * w for e, w in zip(expected, weights)]
  averages = optim.averaged_weights(state.optimizer)
  assert len(averages) == len(weights) == 10
  for average, want, now in zip(averages, expected, weights):
    np.testing.assert_allclose(average.numpy(), want, rtol=0, atol=2e-7)
  assert max(np.abs(a.numpy() - w).max()
             for a, w in zip(averages, weights)) > 1e-3
  for average in averages:  # Every replica holds the same average.
    copies = strategy.experimental_local_results(average.value)
    assert len(copies) == replicas
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy.numpy(), copies[0].numpy())


def test_evaluation_uses_the_averages_and_puts_the_weights_back(tmp_path):
  strategy = tf.distribute.get_strategy()
  state, runner = convnet_training(strategy, total_steps=3, ema_decay=DECAY,
                                   learning_rate=0.01, global_batch_size=16)
  data, dataset = _train_dataset(strategy)
  eval_dataset = data_lib.make_eval_dataset(data, global_batch_size=16)
  with state.evaluation_weights():  # No step yet: the weights as they are.
    untouched = [v.numpy() for v in state.model.trainable_variables]
  runner.train_steps(iter(dataset), tf.constant(3))
  trained = [v.numpy() for v in state.model.trainable_variables]
  raw = runner.evaluate(eval_dataset, 2)
  with state.evaluation_weights():
    averaged = runner.evaluate(eval_dataset, 2)
    inside = [v.numpy() for v in state.model.trainable_variables]
    images = data_lib.to_float(data.test_images[:16])
    logits = state.model(images, training=False).numpy()
  for now, before in zip(state.model.trainable_variables, trained):
    np.testing.assert_array_equal(now.numpy(), before)
  for value, average in zip(inside, optim.averaged_weights(state.optimizer)):
    np.testing.assert_array_equal(value, average.numpy())
  assert not any(np.array_equal(a, b) for a, b in zip(inside, untouched))
  assert averaged["loss"] != raw["loss"]
  # A bare model restored from the checkpoint's averages (as the export and
  # export.py load it) computes the same logits, to the bit.
  run = tmp_path / "run"
  state.checkpoint.save(str(run / "checkpoints" / "ckpt"))
  with open(run / export_lib.MODEL_SPEC_FILE, "w") as f:
    json.dump(export_lib.model_spec(
        class_names=data.class_names, image_shape=data.image_shape,
        model_config=ModelConfig(), averaged_weights=True), f)
  loaded, _, _ = export_lib.load_model_from_run(str(run))
  np.testing.assert_array_equal(loaded(images, training=False).numpy(),
                                logits)
