"""ResNets, synchronized batch norm and per-replica dropout, in process.

Equivalence with ``model.fit`` (one device, 2 and 4 replicas, the negative
case): test_equivalence*.py; kill-and-resume: test_fault_tolerance.py;
the export in a fresh interpreter: test_serving_loaders.py.
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import IN_PROCESS_CPU_REPLICAS
from research import config as config_lib
from research import data as data_lib
from research import distribute
from research import equivalence
from research import model as model_lib
from research import resnet
from research.config import ModelConfig, OptimizerConfig, StepConfig
from research.errors import UserError
from research.layers import (BatchNormalization, FusedBatchNormalization,
                             ReplicaDropout)
from research.layers import rng_states
from research.training import build_training

DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]


def _counts(model):
  return (sum(int(np.prod(w.shape)) for w in model.trainable_weights),
          sum(int(np.prod(w.shape)) for w in model.non_trainable_weights))


def test_resnet20_has_the_papers_parameter_count():
  net = model_lib.create(ModelConfig(name="resnet", resnet_depth=20),
                         num_classes=10, image_shape=(32, 32, 3))
  # He et al., Table 6: "0.27M". Option A shortcuts add no parameters; 19
  # batch norms hold 1,376 moving statistics (means and variances).
  assert _counts(net) == (269_722, 1_376)
  assert len(net.blocks) == 9 and net.logits.units == 10
  convs = [layer for layer in net._flatten_layers()
           if isinstance(layer, tf.keras.layers.Conv2D)]
  assert len(convs) + 1 == 20  # 19 convolutions and the classifier.
  # ResNet-32: three more blocks a stage.
  deeper = model_lib.create(ModelConfig(name="resnet", resnet_depth=32),
                            num_classes=10, image_shape=(32, 32, 3))
  assert _counts(deeper) == (464_154, 2_272)


@pytest.mark.parametrize("config, image_shape", [
    (ModelConfig(dropout=0.5), (32, 32, 3)),
    (ModelConfig(name="resnet", resnet_depth=8, dropout=0.5), (8, 8, 3))])
def test_a_model_only_checkpoint_restores_every_variable(tmp_path, config,
                                                         image_shape):
  """What evaluate.py, export.py and the sidecar read: the model alone."""
  def create():
    return model_lib.create(config, num_classes=3, image_shape=image_shape)
  net = create()
  for w in net.weights:
    w.assign(tf.random.stateless_uniform(w.shape, seed=[len(w.path), 1]))
  path = tf.train.Checkpoint(model=net, rng=rng_states(net)).write(
      str(tmp_path / "ckpt"))
  saved = {name for name, _ in tf.train.list_variables(path)
           if name.startswith(("model/", "rng/"))}
  assert len(saved) == len(model_lib.state_variables(net))
  fresh = create()
  tf.train.Checkpoint(model=fresh, rng=rng_states(fresh)).read(
      path).assert_consumed()
  for a, b in zip(model_lib.state_variables(net),
                  model_lib.state_variables(fresh)):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_resnet_takes_other_image_sizes_and_refuses_other_depths():
  net = model_lib.create(ModelConfig(name="resnet", resnet_depth=8),
                         num_classes=7, image_shape=(64, 64, 3))
  assert net(tf.zeros((2, 64, 64, 3))).shape == (2, 7)
  assert net(tf.zeros((1, 9, 13, 3))).shape == (1, 7)  # Odd sizes too.
  with pytest.raises(ValueError, match="6n\\+2"):
    resnet.ResNet(21)
  with pytest.raises(ValueError, match="resnet_depth must be 6n\\+2"):
    ModelConfig(name="resnet", resnet_depth=22)


def _moving_statistics_after_one_training_pass(devices, sync, images):
  """Each replica's copy of every moving mean and variance after one
  training-mode pass of a float64 ResNet-8 over ``images`` (split evenly
  over ``devices``)."""
  strategy = (tf.distribute.OneDeviceStrategy(devices[0]) if len(devices) == 1
              else distribute.mirrored_strategy(devices))
  with strategy.scope():
    tf.keras.utils.set_random_seed(3)
    net = resnet.ResNet(8, num_classes=4, sync_batch_norm=sync,
                        dtype="float64")
    net(tf.zeros((1,) + images.shape[1:], tf.float64))
  shard = len(images) // len(devices)
  per_replica = strategy.experimental_distribute_values_from_function(
      lambda context: images[context.replica_id_in_sync_group * shard:
                             (context.replica_id_in_sync_group + 1) * shard])
  strategy.run(tf.function(lambda x: net(x, training=True)),
               args=(per_replica,))
  return [[v.numpy() for v in strategy.experimental_local_results(w.value)]
          for w in net.non_trainable_weights]


def test_synchronized_batch_norm_sees_the_global_batch():
  # Two halves with different statistics, one per replica.
  images = np.concatenate([
      np.random.default_rng(0).normal(0.0, 1.0, (4, 8, 8, 3)),
      np.random.default_rng(1).normal(2.0, 3.0, (4, 8, 8, 3))])
  one_device = _moving_statistics_after_one_training_pass(
      DEVICES[:1], False, images)
  synced = _moving_statistics_after_one_training_pass(DEVICES[:2], True,
                                                      images)
  per_replica = _moving_statistics_after_one_training_pass(DEVICES[:2], False,
                                                           images)
  assert len(one_device) == 2 * 7  # 7 batch norms, a mean and a variance.
  assert all(len(copies) == 2 for copies in synced + per_replica)
  for single, both in zip(one_device, synced):
    # Every replica holds the statistics of the whole batch.
    for copy in both:
      np.testing.assert_allclose(copy, single[0], rtol=1e-12, atol=1e-12)
  # Without synchronization each replica keeps its own half's: the copies
  # disagree with each other and with the whole batch's.
  stem_mean = per_replica[0]
  assert not np.allclose(stem_mean[0], stem_mean[1])
  assert not np.allclose(stem_mean[0], one_device[0][0])


def _synchronized_pass(layer_class, all_reduces):
  """One float64 training pass of a synchronized ``layer_class`` on 2
  replicas, each its half of a batch: the number of all-reduces the traced
  pass asked for (the growth of ``all_reduces``), and its outputs, the
  gradients of a cubic loss by input, gamma and beta (every replica's,
  concatenated) and the moving statistics."""
  before = len(all_reduces)
  strategy = distribute.mirrored_strategy(DEVICES[:2])
  images = np.random.default_rng(0).normal(1.0, 3.0, (8, 5, 5, 6))
  with strategy.scope():
    layer = layer_class(momentum=resnet.BN_MOMENTUM,
                        epsilon=resnet.BN_EPSILON, synchronized=True,
                        dtype="float64")
    layer.build(images.shape)
    layer.gamma.assign(
        tf.random.stateless_normal([6], [3, 4], dtype=tf.float64))
  batch = next(iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(images).batch(8))))

  def replica_pass(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      outputs = layer(x, training=True)
      loss = tf.reduce_sum(outputs ** 3)
    return [outputs, *tape.gradient(loss, [x, layer.gamma, layer.beta])]
  results = tf.function(lambda x: strategy.run(replica_pass, (x,)))(batch)
  return len(all_reduces) - before, [
      np.concatenate([np.asarray(v) for v in
                      strategy.experimental_local_results(t)])
      for t in results] + [layer.moving_mean.numpy(),
                           layer.moving_variance.numpy()]


def test_synchronized_batch_norm_is_keras_with_one_all_reduce_a_pass(
    monkeypatch):
  """Keras all-reduces the sum, the sum of squares and the count one by
  one (and two of them again for the gradient); ours stacks them: one
  all-reduce forward and one backward for each replica, with Keras'
  outputs, gradients and moving statistics to the bit."""
  from tensorflow.python.distribute import distribute_lib
  all_reduce = distribute_lib.ReplicaContextBase.all_reduce
  all_reduces = []

  def counted(self, *args, **kwargs):
    all_reduces.append(args[0])
    return all_reduce(self, *args, **kwargs)
  monkeypatch.setattr(distribute_lib.ReplicaContextBase, "all_reduce",
                      counted)
  keras_calls, keras_values = _synchronized_pass(
      tf.keras.layers.BatchNormalization, all_reduces)
  calls, values = _synchronized_pass(BatchNormalization, all_reduces)
  assert keras_calls == 2 * 5 and calls == 2 * 2
  for name, a, b in zip(["outputs", "d_inputs", "d_gamma", "d_beta",
                         "moving_mean", "moving_variance"],
                        keras_values, values):
    np.testing.assert_array_equal(b, a, err_msg=name)
  assert np.abs(values[4]).max() > 0.05  # The statistics moved.


def test_sync_batch_norm_defaults_to_on_with_several_replicas():
  auto = ModelConfig(name="resnet")
  assert not model_lib.resolve_sync_batch_norm(auto, 1)
  assert model_lib.resolve_sync_batch_norm(auto, 2)
  off = ModelConfig(name="resnet", sync_batch_norm=False)
  assert not model_lib.resolve_sync_batch_norm(off, 4)
  with distribute.mirrored_strategy(DEVICES[:2]).scope():
    net = model_lib.create(ModelConfig(name="resnet", resnet_depth=8),
                           num_classes=3, image_shape=(8, 8, 3))
  assert len(model_lib.batch_norms(net, synchronized=True)) == 7
  alone = model_lib.create(ModelConfig(name="resnet", resnet_depth=8),
                           num_classes=3, image_shape=(8, 8, 3))
  assert not model_lib.batch_norms(alone, synchronized=True)
  assert len(model_lib.batch_norms(alone, synchronized=False)) == 7


def _training_pass(layer, images):
  """A training pass of ``layer`` (given gamma and beta): its output, the
  gradients of a cubic loss by input, gamma and beta, and the moving
  statistics after it, all as float64 NumPy."""
  layer.build(images.shape)
  layer.gamma.assign(tf.random.stateless_normal([images.shape[-1]], [3, 4]))
  layer.beta.assign(tf.random.stateless_normal([images.shape[-1]], [5, 6]))
  with tf.GradientTape() as tape:
    tape.watch(images)
    outputs = layer(images, training=True)
    loss = tf.reduce_sum(tf.cast(outputs, tf.float32) ** 3)
  grads = tape.gradient(loss, [images, layer.gamma, layer.beta])
  return [np.asarray(t, np.float64) for t in (
      outputs, *grads, layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_is_keras_batch_norm_up_to_rounding(dtype):
  """The same math (biased variance, moving averages with the momentum):
  output, every gradient and both moving statistics agree to float
  rounding; in inference mode it is Keras' own pass, bitwise."""
  images = tf.random.stateless_normal([8, 5, 5, 6], [1, 2]) * 3 + 1
  settings = dict(momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                  dtype=dtype)
  keras_bn = tf.keras.layers.BatchNormalization(**settings)
  fused_bn = FusedBatchNormalization(**settings)
  for name, a, b in zip(["outputs", "d_inputs", "d_gamma", "d_beta",
                         "moving_mean", "moving_variance"],
                        _training_pass(keras_bn, images),
                        _training_pass(fused_bn, images)):
    np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-6 * np.abs(a).max(),
                               err_msg=name)
  # The statistics moved: 10% of the way from (0, 1) to the batch's.
  assert np.abs(fused_bn.moving_mean.numpy()).max() > 0.05
  np.testing.assert_array_equal(fused_bn(images, training=False),
                                keras_bn(images, training=False))


def test_fused_batch_norm_runs_the_fused_kernel_only_where_it_applies():
  config = ModelConfig(name="resnet", resnet_depth=8, fused_batch_norm=True)
  fused = model_lib.create(config, num_classes=3, image_shape=(8, 8, 3))
  plain = model_lib.create(ModelConfig(name="resnet", resnet_depth=8),
                           num_classes=3, image_shape=(8, 8, 3))
  # The same variables under the same names: checkpoints fit either.
  assert [w.path for w in fused.weights] == [w.path for w in plain.weights]
  assert len([layer for layer in fused._flatten_layers()
              if isinstance(layer, FusedBatchNormalization)]) == 7

  def op_types(net, training):
    graph = tf.function(lambda x: net(x, training=training)
                        ).get_concrete_function(
                            tf.TensorSpec([2, 8, 8, 3])).graph
    return {op.type for op in graph.get_operations()}
  assert "FusedBatchNormV3" in op_types(fused, True)
  assert "FusedBatchNormV3" not in op_types(fused, False)
  assert "FusedBatchNormV3" not in op_types(plain, True)
  # Statistics synchronized over replicas need Keras' pass (an all-reduce
  # between the moments and the transform).
  with distribute.mirrored_strategy(DEVICES[:2]).scope():
    synced = model_lib.create(config, num_classes=3, image_shape=(8, 8, 3))
  assert len(model_lib.batch_norms(synced, synchronized=True)) == 7
  assert "FusedBatchNormV3" not in op_types(synced, True)


def _masks(layer, strategy, calls):
  """Each call's mask on each replica, from a layer on ones."""
  step = tf.function(lambda: strategy.run(
      lambda: layer(tf.ones((2, 64)), training=True)))
  return [[m.numpy() != 0 for m in strategy.experimental_local_results(step())]
          for _ in range(calls)]


def test_dropout_masks_differ_by_replica_and_step_and_repeat_by_seed():
  assert IN_PROCESS_CPU_REPLICAS >= 2
  strategy = distribute.mirrored_strategy(DEVICES[:2])
  runs = []
  for _ in range(2):
    with strategy.scope():
      layer = ReplicaDropout(0.5, seed=7)
    runs.append(_masks(layer, strategy, calls=2))
  (first, second), again = runs[0], runs[1]
  assert not np.array_equal(first[0], first[1])  # Replicas of one step.
  assert not np.array_equal(first[0], second[0])  # Steps.
  np.testing.assert_array_equal(np.array(runs[0]), np.array(again))
  # The state advanced once a step, alike on both copies.
  copies = strategy.experimental_local_results(
      layer.seed_generator.state.value)
  assert [c.numpy()[1] for c in copies] == [2, 2]


def test_dropout_on_one_device_is_keras_dropout():
  x = tf.ones((3, 40))
  stock = tf.keras.layers.Dropout(0.3, seed=11)
  ours = ReplicaDropout(0.3, seed=11)
  for _ in range(3):
    np.testing.assert_array_equal(stock(x, training=True).numpy(),
                                  ours(x, training=True).numpy())
  np.testing.assert_array_equal(ours(x).numpy(), x.numpy())  # Inference.


def test_dropout_state_is_listed_and_copied():
  config = ModelConfig(dropout=0.5)
  net = model_lib.create(config, num_classes=10, image_shape=(32, 32, 3))
  seq = model_lib.create_fit_twin(config, num_classes=10,
                                  image_shape=(32, 32, 3))
  assert list(rng_states(net)) == ["dropout0", "dropout1"]
  rng_states(net)["dropout1"].assign([5, 9])
  model_lib.copy_weights(net, seq)
  np.testing.assert_array_equal(rng_states(seq)["dropout1"].numpy(), [5, 9])
  x = tf.random.stateless_uniform((4, 32, 32, 3), seed=[1, 2])
  np.testing.assert_array_equal(net(x, training=True).numpy(),
                                seq(x, training=True).numpy())


def _resnet_training(strategy, *, jit_compile=False, nan_policy="stop"):
  return build_training(
      strategy=strategy,
      model_config=ModelConfig(name="resnet", resnet_depth=8, dropout=0.2),
      optimizer_config=OptimizerConfig(),
      step_config=StepConfig(global_batch_size=4, jit_compile=jit_compile,
                             nan_policy=nan_policy),
      num_classes=3, image_shape=(8, 8, 3), total_steps=4)


def test_a_skipped_step_leaves_the_batch_statistics_alone():
  state, runner = _resnet_training(tf.distribute.get_strategy(),
                                   nan_policy="skip")
  before = [w.numpy() for w in state.model.non_trainable_weights]
  images = np.full((4, 8, 8, 3), np.nan, np.float32)
  batch = (images, np.zeros(4, np.int32))
  out = runner.train_steps(iter([batch]), tf.constant(1))
  assert int(out["skipped"]) == 1
  for value, w in zip(before, state.model.non_trainable_weights):
    np.testing.assert_array_equal(w.numpy(), value, err_msg=w.path)
  # A finite batch moves them.
  runner.train_steps(iter([(np.ones_like(images), batch[1])]), tf.constant(1))
  assert not np.array_equal(before[0],
                            state.model.non_trainable_weights[0].numpy())


def test_the_training_checkpoint_holds_statistics_and_random_state(tmp_path):
  state, _ = _resnet_training(tf.distribute.get_strategy())
  rng_states(state.model)["dropout0"].assign([4, 6])
  moving_mean = state.model.stem.bn.moving_mean
  moving_mean.assign(tf.fill(moving_mean.shape, 0.25))
  path = state.checkpoint.write(str(tmp_path / "ckpt"))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert "rng/dropout0/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert "model/stem/bn/moving_mean/.ATTRIBUTES/VARIABLE_VALUE" in names
  fresh, _ = _resnet_training(tf.distribute.get_strategy())
  fresh.checkpoint.read(path).assert_consumed()
  np.testing.assert_array_equal(
      rng_states(fresh.model)["dropout0"].numpy(), [4, 6])
  np.testing.assert_array_equal(fresh.model.stem.bn.moving_mean.numpy(),
                                np.full(moving_mean.shape, 0.25))


def test_xla_with_batch_norm_synchronized_over_replicas_is_refused():
  with pytest.raises(UserError, match="--jit_compile with batch norm "
                     "synchronized"):
    _resnet_training(distribute.mirrored_strategy(DEVICES[:2]),
                     jit_compile=True)


def test_dropout_across_a_change_of_replica_count_is_not_compared():
  data = data_lib.make_synthetic(num_train=8, num_test=4, seed=0,
                                 image_shape=(8, 8, 3))
  config = equivalence.EquivalenceConfig(
      replicas=2, fit_replicas=1, global_batch_size=4,
      model=config_lib.ModelConfig(name="resnet", resnet_depth=8,
                                   dropout=0.1))
  with pytest.raises(UserError, match="each replica draws its masks"):
    equivalence.run(config, data, DEVICES[:2])
