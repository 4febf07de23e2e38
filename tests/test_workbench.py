"""The research workbench: optimizers, schedules, rich summaries, records."""

import glob
import json
import math
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from conftest import REPO, read_scalars, run_in_process, train_in_process
from research import data as data_lib
from research import model as model_lib
from research import optim
from research.config import ModelConfig
from research.config import OptimizerConfig
from research.config import StepConfig
from research.training import build_training


# The schedules' formulas, written out independently of research/optim.py.
def _expected_rate(name, step, *, base, total, warmup, rate=0.1, every=0):
  if step < warmup:
    return base * (step + 1) / warmup
  t, span = step - warmup, total - warmup
  if name == "constant":
    return base
  if name == "cosine":
    return base * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
  if name == "step":
    return base * rate ** (t // (every or span // 3))
  return base * rate ** (t / (every or span))


@pytest.mark.parametrize("name,every", [
    ("constant", 0), ("cosine", 0), ("step", 0), ("step", 7),
    ("exponential", 0), ("exponential", 10)])
def test_schedules_follow_their_formulas(name, every):
  schedule = optim.make_schedule(OptimizerConfig(
      lr_schedule=name, learning_rate=0.5, warmup_steps=10, lr_decay_rate=0.1,
      lr_decay_steps=every), total_steps=100)
  for step in (0, 4, 9, 10, 11, 30, 43, 66, 67, 99):
    np.testing.assert_allclose(
        float(schedule(step)),
        _expected_rate(name, step, base=0.5, total=100, warmup=10,
                       every=every), rtol=1e-5, atol=1e-7,
        err_msg=f"step {step}")


def test_constant_without_warmup_is_a_plain_rate_and_bad_values_are_named():
  assert optim.make_schedule(OptimizerConfig(learning_rate=0.1),
                             total_steps=10) == 0.1
  # OptimizerConfig is the one place of these rules (the flags use it too:
  # tests/test_train_loop_script.py).
  for kwargs, message in [
      (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0"),
      (dict(lr_decay_rate=0.0), "lr_decay_rate must be in (0, 1], got 0.0"),
      (dict(lr_decay_steps=-1), "lr_decay_steps must be >= 0, got -1"),
      (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
      (dict(ema_decay=-0.5), "ema_decay must be in [0, 1), got -0.5"),
      (dict(name="lamb"), "name must be one of")]:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
      OptimizerConfig(lr_schedule="cosine", **kwargs)


def _run(tmp_path, name, **overrides):
  settings = dict(epochs=3, global_batch_size=32, steps_per_loop=8,
                  checkpoint_every_steps=0, seed=1, export=False,
                  eval_images=0)
  settings.update(overrides)
  data = data_lib.make_synthetic(num_train=512, num_test=128, seed=1)
  metrics = train_in_process(tmp_path / name, data, **settings)
  return metrics, read_scalars(str(tmp_path / name / "train"))


@pytest.mark.parametrize("optimizer,schedule,extra", [
    ("adam", "cosine", {}),
    ("adamw", "exponential", {"weight_decay": 0.05}),
    ("sgd", "step", {"learning_rate": 0.05, "nesterov": True}),
    ("sgd", "constant", {"learning_rate": 0.3, "momentum": 0.0,
                         "clip_grad_norm": 0.5, "label_smoothing": 0.1}),
])
def test_each_optimizer_and_schedule_trains_and_logs_its_rate(
    tmp_path, optimizer, schedule, extra):
  settings = dict(optimizer=optimizer, lr_schedule=schedule, warmup_steps=6)
  settings.update(extra)
  metrics, train = _run(tmp_path, "run", **settings)
  assert metrics["global_step"] == 48
  losses = [v for _, v in train["loss"]]
  assert losses[-1] < losses[0] - 0.2, losses
  rates = dict(train["learning_rate"])
  assert sorted(rates) == list(range(1, 49))  # One value per step.
  base = settings.get("learning_rate", 0.001)
  for step in (1, 3, 6, 7, 20, 48):  # Step s runs at optimizer step s - 1.
    np.testing.assert_allclose(
        rates[step], _expected_rate(schedule, step - 1, base=base, total=48,
                                    warmup=6), rtol=1e-5, atol=1e-9,
        err_msg=f"{optimizer}/{schedule} at step {step}")
  norms = dict(train["grad_norm"])
  assert sorted(norms) == list(range(1, 49))
  assert all(np.isfinite(v) and v > 0 for v in norms.values())


def test_grad_norm_is_the_norm_of_the_global_gradient():
  strategy = tf.distribute.get_strategy()
  data = data_lib.make_synthetic(num_train=64, num_test=8, seed=0)
  state, runner = build_training(
      strategy=strategy, model_config=ModelConfig(),
      optimizer_config=OptimizerConfig(),
      step_config=StepConfig(global_batch_size=16, clip_grad_norm=0.01),
      num_classes=10, image_shape=(32, 32, 3), total_steps=1,
      keep_last_gradients=True)
  net = state.model
  x, y = next(iter(data_lib.make_train_dataset(data, global_batch_size=16,
                                               seed=0, num_epochs=1)))
  before = [v.numpy() for v in net.trainable_variables]
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(runner.loss_fn(y, net(x, training=True)))
  expected = tape.gradient(loss, net.trainable_variables)
  out = runner.train_steps(
      iter(data_lib.make_train_dataset(data, global_batch_size=16, seed=0,
                                       num_epochs=1)), tf.constant(1))
  norm = float(out["step_grad_norms"][0])
  np.testing.assert_allclose(norm, float(tf.linalg.global_norm(expected)),
                             rtol=1e-5)
  assert norm > 0.01
  # The recorded gradient is the clipped one: norm 0.01, same direction.
  clipped = out["last_gradients"]
  np.testing.assert_allclose(float(tf.linalg.global_norm(clipped)), 0.01,
                             rtol=1e-4)
  np.testing.assert_allclose(clipped[0].numpy(),
                             expected[0].numpy() * 0.01 / norm, rtol=1e-4,
                             atol=1e-9)
  assert any(not np.array_equal(b, v.numpy())
             for b, v in zip(before, net.trainable_variables))


def _tensor_tags(event_dir):
  acc = event_accumulator.EventAccumulator(
      event_dir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def test_event_files_hold_histograms_images_hparams_and_a_profile(tmp_path):
  metrics, train = _run(tmp_path, "rich", histogram_every_steps=16,
                        eval_images=10, profile_steps=(10, 12),
                        lr_schedule="cosine")
  model_dir = tmp_path / "rich"
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "weight_norm",
          "steps_per_second", "examples_per_second"} <= set(train)
  assert all(v > 0 for _, v in train["weight_norm"])

  acc = _tensor_tags(str(model_dir / "train"))
  variables = model_lib.build(model_lib.ConvNet()).trainable_variables
  for v in variables:
    for kind in ("weights", "gradients"):
      events = acc.Tensors(f"{kind}/{v.path}")
      assert [e.step for e in events] == [16, 32, 48], (kind, v.path)
      buckets = tf.make_ndarray(events[-1].tensor_proto)
      # [left edge, right edge, count] per bucket; counts cover every entry.
      assert buckets.shape[1] == 3
      assert buckets[:, 2].sum() == np.prod(v.shape)

  evals = read_scalars(str(model_dir / "test"))
  names = data_lib.make_synthetic(num_train=1, num_test=1, seed=0).class_names
  per_class = [evals[f"class_accuracy/{n}"][-1][1] for n in names
               if f"class_accuracy/{n}" in evals]
  assert len(per_class) >= 8
  np.testing.assert_allclose(metrics["eval_accuracy"],
                             evals["accuracy"][-1][1])
  acc = _tensor_tags(str(model_dir / "test"))
  for tag in ("predictions", "confusion_matrix", "reliability_diagram"):
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [16, 32, 48]
    # An image summary: width, height, then the PNG-encoded images.
    encoded = tf.make_ndarray(events[-1].tensor_proto)
    image = tf.io.decode_png(encoded[2])
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.numpy())) > 10  # Not a blank canvas.

  root = _tensor_tags(str(model_dir))
  [start] = root.Tensors("_hparams_/session_start_info")
  info = hparams_metadata.parse_session_start_info_plugin_data(
      root.SummaryMetadata("_hparams_/session_start_info")
      .plugin_data.content)
  assert info.hparams["lr_schedule"].string_value == "cosine"
  assert info.hparams["global_batch_size"].number_value == 32
  assert info.hparams["augment"].bool_value is False
  assert info.group_name == "rich"
  assert start.step == 0

  traces = glob.glob(str(model_dir / "plugins" / "profile" / "*" /
                         "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


@pytest.mark.slow  # Two runs, one on 2 replicas.
def test_global_norm_clipping_is_over_all_replicas(tmp_path):
  """With SGD the update is lr x clipped gradient: clipping each replica's
  half of the gradient (Keras 3's own clipnorm under a strategy) would move
  the weights up to twice as far as clipping their sum."""
  common = ["--flagfile=configs/smoke.flags", "--epochs=1",
            "--optimizer=sgd", "--momentum=0", "--learning_rate=0.5",
            "--clip_grad_norm=0.05", "--deterministic", "--noexport"]
  runs = {}
  for replicas in (0, 2):
    model_dir = str(tmp_path / f"r{replicas}")
    proc = run_in_process("train_loop.py", *common,
                          f"--cpu_replicas={replicas}",
                          f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    runs[replicas] = (
        {n: tf.train.load_checkpoint(path).get_tensor(n)
         for n, _ in tf.train.list_variables(path) if n.startswith("model/")},
        dict(read_scalars(os.path.join(model_dir, "train"))["grad_norm"]))
  (w1, norms1), (w2, norms2) = runs[0], runs[2]
  assert min(norms1.values()) > 0.05 * 4  # Clipping was active every step.
  for step, value in norms1.items():
    np.testing.assert_allclose(norms2[step], value, rtol=1e-4)
  for name, value in w1.items():
    np.testing.assert_allclose(w2[name], value, rtol=1e-4, atol=1e-6,
                               err_msg=name)


def test_run_record_traces_the_command_code_and_devices(tmp_path):
  model_dir = str(tmp_path / "rec")
  args = ["--flagfile=configs/smoke.flags", "--epochs=1", "--noexport",
          f"--model_dir={model_dir}"]
  assert run_in_process("train_loop.py", *args).returncode == 0
  # A resume.
  assert run_in_process("train_loop.py", *args, "--epochs=2").returncode == 0
  with open(os.path.join(model_dir, "run_record.json")) as f:
    records = json.load(f)["invocations"]
  assert len(records) == 2
  first, second = records
  assert first["command"].endswith(
      "scripts/train_loop.py --flagfile=configs/smoke.flags --epochs=1 "
      f"--noexport --model_dir={model_dir}")
  assert second["command"].endswith("--epochs=2")
  assert first["versions"]["tensorflow"] == tf.__version__
  assert first["versions"]["numpy"] == np.__version__
  assert set(first["versions"]) == {"python", "tensorflow", "keras", "numpy"}
  head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"],
                        capture_output=True, text=True)
  if head.returncode == 0:
    assert first["git"]["commit"] == head.stdout.strip()
    assert isinstance(first["git"]["dirty"], bool)
  assert any(d["type"] == "CPU" for d in first["logical_devices"])
  with open(os.path.join(model_dir, "model.json")) as f:
    assert json.load(f)["image_shape"] == [32, 32, 3]
