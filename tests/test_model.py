import numpy as np
import tensorflow as tf

from research import model as model_lib


def test_convnet_has_the_seed_architecture_with_flatten():
  net = model_lib.build(model_lib.ConvNet())
  assert net.count_params() == 122_570
  out = net(tf.zeros((5, 32, 32, 3)))
  assert out.shape == (5, 10)
  names = [layer.name for layer in net.stack]
  assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "flatten",
                   "dense1", "logits"]
  # Logits, not probabilities: the last layer has no activation.
  assert net.stack[-1].activation is tf.keras.activations.linear


def test_sequential_form_matches_after_copying_weights():
  net = model_lib.build(model_lib.ConvNet())
  seq = model_lib.build_sequential()
  assert seq.count_params() == 122_570
  x = tf.random.stateless_uniform((7, 32, 32, 3), seed=[1, 2])
  assert not np.allclose(net(x).numpy(), seq(x).numpy())
  model_lib.copy_weights(net, seq)
  np.testing.assert_array_equal(net(x).numpy(), seq(x).numpy())
  # And back the other way, onto a fresh subclassed model.
  other = model_lib.build(model_lib.ConvNet())
  model_lib.copy_weights(seq, other)
  np.testing.assert_array_equal(other(x).numpy(), seq(x).numpy())


def test_copy_weights_refuses_a_different_model():
  small = model_lib.build(model_lib.ConvNet(num_classes=3))
  big = model_lib.build(model_lib.ConvNet(num_classes=10))
  try:
    model_lib.copy_weights(small, big)
  except ValueError as e:
    assert "shape" in str(e)
  else:
    raise AssertionError("copy_weights accepted mismatched shapes")


def test_l2_adds_one_penalty_per_kernel():
  net = model_lib.build(model_lib.ConvNet(l2=1e-3))
  assert len(net.losses) == 5
  expected = sum(1e-3 * np.sum(np.square(layer.kernel.numpy()))
                 for layer in net.stack if hasattr(layer, "kernel"))
  np.testing.assert_allclose(float(tf.add_n(net.losses)), expected, rtol=1e-5)


def test_model_checkpoint_round_trip_without_optimizer(tmp_path):
  net = model_lib.build(model_lib.ConvNet())
  path = tf.train.Checkpoint(model=net).save(str(tmp_path / "ckpt"))
  names = [n for n, _ in tf.train.list_variables(path)]
  assert "model/conv1/_kernel/.ATTRIBUTES/VARIABLE_VALUE" in names
  other = model_lib.build(model_lib.ConvNet())
  tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
  for a, b in zip(net.weights, other.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
