"""In-process tests of the step functions and the loop."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import convnet_training
from research import data as data_lib
from research import model as model_lib
from research import steps as steps_lib


def _runner(strategy, *, global_batch_size, keep_short_batch=False, lr=1e-3):
  _, runner = convnet_training(strategy, learning_rate=lr,
                               global_batch_size=global_batch_size,
                               keep_short_batch=keep_short_batch)
  return runner


def test_a_runner_refuses_an_optimizer_that_would_sum_twice():
  with tf.distribute.get_strategy().scope():
    net = model_lib.build(model_lib.ConvNet())
    optimizer = tf.keras.optimizers.Adam()
    optimizer.build(net.trainable_variables)
  with pytest.raises(ValueError, match="expect_presummed_gradients"):
    steps_lib.StepRunner(strategy=tf.distribute.get_strategy(), model=net,
                         optimizer=optimizer, global_batch_size=8)


@pytest.mark.slow  # 208 steps.
def test_a_few_hundred_steps_drive_the_loss_well_down():
  tf.keras.utils.set_random_seed(0)
  strategy = tf.distribute.get_strategy()
  data = data_lib.make_synthetic(num_train=512, num_test=128, seed=0)
  runner = _runner(strategy, global_batch_size=32)
  ds = data_lib.make_train_dataset(data, global_batch_size=32, seed=0,
                                   num_epochs=13)
  iterator = iter(strategy.experimental_distribute_dataset(ds))
  losses = np.concatenate([
      runner.train_steps(iterator, tf.constant(52))["step_losses"].numpy()
      for _ in range(4)])
  assert len(losses) == 208
  assert losses[:5].mean() > 2.0
  assert losses[-10:].mean() < 0.2 * losses[:5].mean()
  assert runner.optimizer.iterations.numpy() == 208
  evaluation = runner.evaluate(
      data_lib.make_eval_dataset(data, global_batch_size=32),
      data_lib.eval_steps(128, 32))
  assert evaluation["count"] == 128
  assert evaluation["accuracy"] > 0.9


def test_step_function_is_traced_once_for_any_step_count():
  strategy = tf.distribute.get_strategy()
  data = data_lib.make_synthetic(num_train=64, num_test=8, seed=0)
  runner = _runner(strategy, global_batch_size=16)
  iterator = iter(data_lib.make_train_dataset(data, global_batch_size=16,
                                              seed=0, num_epochs=3))
  for n in (1, 3, 5):
    out = runner.train_steps(iterator, tf.constant(n))
    assert out["step_losses"].shape == (n,)
    assert int(out["count"]) == 16 * n
  assert runner.train_steps.experimental_get_tracing_count() == 1


def test_short_batch_loss_is_the_mean_over_its_examples():
  strategy = tf.distribute.get_strategy()
  data = data_lib.make_synthetic(num_train=20, num_test=8, seed=0)
  runner = _runner(strategy, global_batch_size=8, keep_short_batch=True,
                   lr=1e-9)
  ds = data_lib.make_train_dataset(data, global_batch_size=8, seed=0,
                                   num_epochs=1, drop_remainder=False)
  batches = list(ds)
  assert [len(y) for _, y in batches] == [8, 8, 4]
  # With a vanishing learning rate the weights stay put, so each step's loss
  # can be recomputed directly from the batch.
  expected = [float(tf.reduce_mean(runner.loss_fn(y, runner.model(x))))
              for x, y in batches]
  out = runner.train_steps(iter(ds), tf.constant(3))
  np.testing.assert_allclose(out["step_losses"].numpy(), expected, rtol=1e-5)


def test_eval_accuracy_is_correct_over_total_not_a_mean_of_batches():
  strategy = tf.distribute.get_strategy()
  data = data_lib.make_synthetic(num_train=16, num_test=13, seed=1)
  runner = _runner(strategy, global_batch_size=8)
  result = runner.evaluate(data_lib.make_eval_dataset(data,
                                                      global_batch_size=8),
                           data_lib.eval_steps(13, 8))
  logits = runner.model(data.test_images.astype(np.float32) / 255.0)
  predicted = np.argmax(logits.numpy(), axis=-1)
  assert result["count"] == 13
  assert result["correct"] == int(np.sum(predicted == data.test_labels))
  assert result["accuracy"] == result["correct"] / 13
  expected_loss = float(tf.reduce_mean(runner.loss_fn(data.test_labels,
                                                      logits)))
  np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)


def _train_run(tmp_path, name, **overrides):
  from conftest import read_scalars, train_in_process
  settings = dict(epochs=3, global_batch_size=32, steps_per_loop=8,
                  checkpoint_every_steps=16, seed=1)
  settings.update(overrides)
  data = data_lib.make_synthetic(num_train=512, num_test=128, seed=1)
  metrics = train_in_process(tmp_path / name, data, **settings)
  losses = [v for _, v in read_scalars(str(tmp_path / name / "train"))["loss"]]
  return metrics, losses


# float32 with XLA and mixed_float16 (with its loss scaling) are not
# trained here: tests/test_equivalence.py (float16 with XLA) and
# tests/test_equivalence_replicas.py (float16 on 2 replicas) prove the
# compiled step and the loss scaling bitwise equal to fit, step by step, and
# test_gpu_readiness.py trains float32 with XLA.
@pytest.mark.parametrize("precision", [
    "float32", pytest.param("mixed_bfloat16", marks=pytest.mark.slow)])
def test_float32_and_bfloat16_train(tmp_path, precision):
  metrics, losses = _train_run(tmp_path, "run", mixed_precision=precision,
                               jit_compile=False)
  assert metrics["global_step"] == 48
  assert losses[-1] < losses[0] - 0.3, losses
  assert metrics["eval_accuracy"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_steps_per_loop_changes_no_result(tmp_path):
  """5 steps a call (calls cut at every evaluation and checkpoint) against
  16 (one call an epoch)."""
  weights = []
  for steps_per_loop in (5, 16):
    metrics, losses = _train_run(tmp_path, f"spl{steps_per_loop}",
                                 steps_per_loop=steps_per_loop,
                                 deterministic=True)
    path = tf.train.latest_checkpoint(
        str(tmp_path / f"spl{steps_per_loop}" / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    weights.append({n: reader.get_tensor(n)
                    for n, _ in tf.train.list_variables(path)
                    if n.startswith("model/")})
    assert metrics["global_step"] == 48
  for other in weights[1:]:
    for name, value in weights[0].items():
      np.testing.assert_array_equal(value, other[name], err_msg=name)
