"""GPU code paths, proven on CPU where the mechanism allows (issue 17).

The XLA rule is a pure function of the facts it looks at, tested over every
combination, including GPU ones; what depends on a real strategy is tested
on the logical CPUs.
"""

import collections
import itertools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, convnet_training
from research import data as data_lib
from research import distribute
from research.errors import UserError

# (device, replicas, strategy, deterministic) -> auto's XLA setting.
# Only one GPU under OneDeviceStrategy, without determinism, gets XLA: the
# one case where the loop's whole step compiles and Keras' auto would not
# try (it is off under any tf.distribute strategy).
STRATEGY_KINDS = {"one_device": True, "mirrored": False,
                  "multi_worker_mirrored": False}


def test_native_bfloat16_is_read_from_the_cpu_flags():
  def cpuinfo(flags):
    return (f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\n"
            f"processor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
  assert distribute.cpu_has_native_bfloat16(cpuinfo("avx512f avx512_bf16"))
  assert distribute.cpu_has_native_bfloat16(cpuinfo("avx512f amx_bf16"))
  assert distribute.cpu_has_native_bfloat16(cpuinfo("avx2 avx512f")) is False
  # Not x86, or no cpuinfo: unknown, and then nothing is claimed.
  assert distribute.cpu_has_native_bfloat16("processor : 0\nFeatures : fp "
                                            "asimd bf16\n") is None
  assert distribute.cpu_has_native_bfloat16("") is None


@pytest.mark.parametrize("device,replicas,kind,deterministic", [
    (d, r, k, det) for d, r, k, det in itertools.product(
        ("GPU", "CPU"), (1, 2), STRATEGY_KINDS, (False, True))
    if not (k == "one_device" and r == 2)])
def test_auto_xla_is_on_only_for_one_gpu_under_one_device(
    device, replicas, kind, deterministic):
  expected = (device == "GPU" and replicas == 1 and kind == "one_device"
              and not deterministic)
  assert distribute.auto_jit_compile(
      device_type=device, replicas=replicas,
      updates_in_xla=STRATEGY_KINDS[kind] and replicas == 1,
      deterministic=deterministic) is expected


def _cpu_strategies():
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  return {"one_device": tf.distribute.OneDeviceStrategy(cpus[0]),
          "mirrored_1": distribute.mirrored_strategy(cpus[:1]),
          "mirrored_2": distribute.mirrored_strategy(cpus[:2])}


def test_the_strategy_facts_the_rule_reads():
  strategies = _cpu_strategies()
  assert distribute.compiles_updates_in_xla(strategies["one_device"])
  assert not distribute.compiles_updates_in_xla(strategies["mirrored_1"])
  assert not distribute.compiles_updates_in_xla(strategies["mirrored_2"])
  for strategy in strategies.values():  # CPUs: auto is off.
    for deterministic in (False, True):
      assert not distribute.resolve_jit_compile(
          "auto", strategy, deterministic=deterministic)
  assert distribute.resolve_jit_compile("true", strategies["mirrored_1"],
                                        deterministic=False)
  with pytest.raises(UserError, match="--deterministic cannot be combined"):
    distribute.resolve_jit_compile("true", strategies["one_device"],
                                   deterministic=True)
  with pytest.raises(UserError, match="several CPU replicas"):
    distribute.resolve_jit_compile("true", strategies["mirrored_2"],
                                   deterministic=False)


def test_one_replica_mirrored_xla_compiles_the_step_but_not_the_update():
  """What a 1-GPU MirroredStrategy run with XLA does (finding 2): the
  forward and backward pass in XLA, the update outside it, and it trains."""
  strategy = _cpu_strategies()["mirrored_1"]
  _, runner = convnet_training(strategy, total_steps=4, global_batch_size=16,
                               jit_compile=True)
  assert isinstance(runner._replica_gradients, tf.types.experimental.GenericFunction)  # pylint: disable=protected-access
  assert not isinstance(runner._replica_apply, tf.types.experimental.GenericFunction)  # pylint: disable=protected-access
  data = data_lib.make_synthetic(num_train=64, num_test=8, seed=0)
  iterator = iter(strategy.experimental_distribute_dataset(
      data_lib.make_train_dataset(data, global_batch_size=16, seed=0,
                                  num_epochs=1)))
  losses = runner.train_steps(iterator, tf.constant(4))["step_losses"]
  assert np.all(np.isfinite(losses.numpy()))
  assert int(runner.optimizer.iterations.numpy()) == 4


# GPU selection and memory (finding 4) ----------------------------------------


def test_each_local_worker_gets_its_own_gpus():
  import launch_local
  assert launch_local.worker_gpus(2, ["0", "1", "2", "3"], None) == ["0", "1"]
  assert launch_local.worker_gpus(2, ["0", "1", "2", "3"], 2) == ["0,1",
                                                                  "2,3"]
  assert launch_local.worker_gpus(2, ["4", "7"], None) == ["4", "7"]
  # No GPUs: every worker sees none (and TensorFlow uses the CPU).
  assert launch_local.worker_gpus(3, [], None) == ["", "", ""]
  assert launch_local.worker_gpus(2, ["0", "1"], 0) == ["", ""]
  with pytest.raises(ValueError, match="2 workers x 2 GPUs need 4 GPUs but "
                     "3 are available"):
    launch_local.worker_gpus(2, ["0", "1", "2"], 2)


def test_the_launcher_reads_the_gpus_it_may_use(monkeypatch):
  import launch_local
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
  assert launch_local.host_gpus() == ["2", "5"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  assert launch_local.host_gpus() == []
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  monkeypatch.setenv("PATH", "/nonexistent")  # No nvidia-smi: no GPUs.
  assert launch_local.host_gpus() == []


class _FakeGpu:
  def __init__(self, index):
    self.name = f"/physical_device:GPU:{index}"
    self.device_type = "GPU"


def test_num_gpus_hides_the_others_and_memory_growth_is_set(monkeypatch):
  gpus = [_FakeGpu(i) for i in range(4)]
  calls = []
  real_list = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, "list_physical_devices",
                      lambda kind=None: gpus if kind == "GPU"
                      else real_list(kind))
  monkeypatch.setattr(tf.config, "set_visible_devices",
                      lambda devices, kind: calls.append(
                          ("visible", [d.name[-1] for d in devices], kind)))
  monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                      lambda device, on: calls.append(
                          ("growth", device.name[-1], on)))
  distribute.configure_devices(num_gpus=2, gpu_memory_growth=True)
  assert calls == [("visible", ["0", "1"], "GPU"), ("growth", "0", True),
                   ("growth", "1", True)]
  calls.clear()
  distribute.configure_devices(num_gpus=None)  # All of them, as they are.
  assert calls == []


# No int32 collectives (finding 1) --------------------------------------------


@pytest.mark.slow
def test_no_collective_in_any_graph_carries_int32(tmp_path):
  """Two real workers trace the train step (keep_short_batch), the eval step
  and the preemption vote; every all-reduce in those graphs must be a type
  GPUs take."""
  import launch_local
  ports = launch_local.free_ports(2)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "collective_dtypes.py"),
         str(tmp_path / f"worker{i}.json")], cwd=REPO,
        env=dict(env, TF_CONFIG=launch_local.tf_config(ports, i)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=180)
      assert proc.returncode == 0, err[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  with open(tmp_path / "worker0.json") as f:
    found = json.load(f)
  by_function = {name for name, _, _, _ in found}
  # The graphs do hold collectives (else this test could not fail).
  assert by_function == {"train_steps", "eval_steps", "preemption_vote"}
  assert {op for _, op, _, _ in found} <= {"CollectiveReduceV2"}
  # int32 is the one type GPU collectives refuse (TensorFlow's
  # collective_ops_gpu_test.py expects that error); the int64 counts
  # (examples, correct answers, the confusion matrix) are taken.
  assert not [c for c in found if c[2] == "int32"], found
  assert {dtype for _, _, dtype, _ in found} <= {"float32", "int64"}
  # Finding 7: per step, one all-reduce for the gradients, the loss and
  # the counts together (with keep_short_batch one more, before them, for
  # the batch size); per evaluation step one for the loss and the confusion
  # matrix. The int64 one in each is the distributed iterator's own check
  # for a partial batch. (Before: six a training step, three an eval step.)
  counts = collections.Counter((name, dtype) for name, _, dtype, _ in found)
  assert counts == {("train_steps", "float32"): 2,
                    ("train_steps", "int64"): 1,
                    ("eval_steps", "float32"): 1, ("eval_steps", "int64"): 1,
                    ("preemption_vote", "float32"): 1}, found


# No empty replica batch (finding 6) ------------------------------------------


def test_a_last_eval_batch_smaller_than_the_replicas_share_is_counted_once():
  """11 test examples, a global batch of 8 on 2 replicas: the last batch
  has 3 rows, which consecutive slices gave all to replica 0 (replica 1
  empty). Padded with weight-0 rows, each replica gets 4 rows, and the
  result is that of the 11 real examples alone."""
  strategy = _cpu_strategies()["mirrored_2"]
  _, runner = convnet_training(strategy, global_batch_size=8)
  data = data_lib.make_synthetic(num_train=16, num_test=11, seed=3)
  shapes = [[int(images.shape[0]) for images in
             strategy.experimental_local_results(step[0])]
            for step in strategy.distribute_datasets_from_function(
                lambda context: data_lib.make_eval_dataset(
                    data, global_batch_size=8, input_context=context))]
  assert shapes == [[4, 4], [4, 4]]  # Steps x replicas.
  result = runner.evaluate(
      strategy.distribute_datasets_from_function(
          lambda context: data_lib.make_eval_dataset(
              data, global_batch_size=8, input_context=context)),
      data_lib.eval_steps(11, 8))
  logits = runner.model(data_lib.to_float(data.test_images))
  predicted = np.argmax(logits.numpy(), axis=-1)
  assert result["count"] == 11
  assert result["correct"] == int(np.sum(predicted == data.test_labels))
  expected_loss = float(tf.reduce_mean(runner.loss_fn(data.test_labels,
                                                      logits)))
  np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)


# The step preprocesses on accelerators (finding 7) ---------------------------


def _train_and_evaluate(strategy, data, *, in_pipeline):
  tf.keras.utils.set_random_seed(5)
  state, runner = convnet_training(strategy, total_steps=6,
                                   global_batch_size=8)
  train = iter(strategy.distribute_datasets_from_function(
      lambda context: data_lib.make_train_dataset(
          data, global_batch_size=8, seed=2, num_epochs=3, augment=True,
          cutout=6, input_context=context,
          preprocess_in_pipeline=in_pipeline)))
  element = next(iter(strategy.distribute_datasets_from_function(
      lambda context: data_lib.make_train_dataset(
          data, global_batch_size=8, seed=2, num_epochs=1, augment=True,
          cutout=6, input_context=context,
          preprocess_in_pipeline=in_pipeline))))
  out = runner.train_steps(train, tf.constant(6))
  result = runner.evaluate(strategy.distribute_datasets_from_function(
      lambda context: data_lib.make_eval_dataset(
          data, global_batch_size=8, input_context=context,
          preprocess_in_pipeline=in_pipeline)), data_lib.eval_steps(11, 8))
  return (element, out["step_losses"].numpy(),
          [v.numpy() for v in state.model.weights], result)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["one_device", "mirrored_2"])
def test_preprocessing_in_the_step_trains_exactly_as_in_the_pipeline(kind):
  """What GPUs get: uint8 pixels (and the drawn crops, flips and cutout
  boxes) cross to the device and the step preprocesses them; on the logical
  CPUs, forced, it gives bitwise the same steps, weights and evaluation."""
  strategy = _cpu_strategies()[kind]
  data = data_lib.make_synthetic(num_train=24, num_test=11, seed=4)
  on_host = _train_and_evaluate(strategy, data, in_pipeline=True)
  on_device = _train_and_evaluate(strategy, data, in_pipeline=False)
  # What crosses: uint8 pixels, a quarter of the bytes, with the draws.
  pixels, _, offsets, flips, boxes = on_device[0]
  assert strategy.experimental_local_results(pixels)[0].dtype == tf.uint8
  assert strategy.experimental_local_results(offsets)[0].shape == (
      8 // strategy.num_replicas_in_sync, 2)
  assert strategy.experimental_local_results(boxes)[0].shape == (
      8 // strategy.num_replicas_in_sync, 4)
  assert strategy.experimental_local_results(on_host[0][0])[0].dtype == (
      tf.float32)
  np.testing.assert_array_equal(on_device[1], on_host[1])
  assert np.all(np.isfinite(on_host[1]))
  for device_weight, host_weight in zip(on_device[2], on_host[2]):
    np.testing.assert_array_equal(device_weight, host_weight)
  for key in ("loss", "correct", "count"):
    assert on_device[3][key] == on_host[3][key]
  np.testing.assert_array_equal(on_device[3]["confusion"],
                                on_host[3]["confusion"])


def test_the_step_preprocesses_on_accelerators_only():
  assert not distribute.preprocesses_on_device(
      _cpu_strategies()["mirrored_2"])
  assert not distribute.preprocesses_on_device(tf.distribute.get_strategy())
  assert distribute.device_type(_cpu_strategies()["one_device"]) == "CPU"

  class OnGpus:  # What a MirroredStrategy over two GPUs reports.
    extended = types.SimpleNamespace(worker_devices=(
        "/job:localhost/replica:0/task:0/device:GPU:0",
        "/job:localhost/replica:0/task:0/device:GPU:1"))

  assert distribute.device_type(OnGpus()) == "GPU"
  assert distribute.preprocesses_on_device(OnGpus())
