"""scripts/benchmark.py and its FLOP count (no timings are asserted)."""

import json

import pytest

from conftest import run_in_process
from research import benchmarking
from research import model as model_lib
from research.config import ModelConfig


def test_flop_count_of_the_convnet():
  net = model_lib.build(model_lib.ConvNet())
  forward = {  # 2 x multiply-adds per example
      "conv1": 2 * 30 * 30 * 3 * 3 * 3 * 32,
      "conv2": 2 * 13 * 13 * 3 * 3 * 32 * 64,
      "conv3": 2 * 4 * 4 * 3 * 3 * 64 * 64,
      "dense1": 2 * 1024 * 64,
      "logits": 2 * 64 * 10,
  }
  # Forward + weight gradient everywhere, + input gradient but for conv1.
  expected = 3 * sum(forward.values()) - forward["conv1"]
  assert benchmarking.training_flops_per_example(net, (32, 32, 3)) == expected
  assert expected == 25_736_448


def test_flop_count_of_resnet20_is_counted_the_same_way():
  net = model_lib.create(ModelConfig(name="resnet", resnet_depth=20),
                         num_classes=10, image_shape=(32, 32, 3))
  # Multiply-adds per example of each convolution (3x3), then the classifier.
  stem = 32 * 32 * 9 * 3 * 16
  stages = (6 * 32 * 32 * 9 * 16 * 16 +
            16 * 16 * 9 * 16 * 32 + 5 * 16 * 16 * 9 * 32 * 32 +
            8 * 8 * 9 * 32 * 64 + 5 * 8 * 8 * 9 * 64 * 64)
  forward = 2 * (stem + stages + 64 * 10)
  expected = 3 * forward - 2 * stem
  assert benchmarking.training_flops_per_example(net, (32, 32, 3)) == expected
  assert expected == 242_421_504


@pytest.mark.slow
def test_benchmark_script_reports_every_contender(tmp_path):
  out = tmp_path / "bench.json"
  proc = run_in_process("benchmark.py", "--batch_sizes=16",
                        "--xla_batch_sizes=", "--windows=1",
                        "--window_examples=160", "--synthetic_train_size=512",
                        "--matmul_size=256", "--precisions=mixed_bfloat16",
                        f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out.read_text())
  assert report["flops_per_example"] == 25_736_448
  assert set(report["matmul_gflops"]) == {"mixed_bfloat16"}
  assert report["matmul_gflops"]["mixed_bfloat16"] > 0
  (row,) = report["results"]
  assert row["batch_size"] == 16 and row["window_steps"] == 10
  assert row["precision"] == "mixed_bfloat16"
  assert set(row["examples_per_second"]) == {
      "loop", "loop_synthetic", "fit_default", "fit_matched"}
  assert all(len(v) == 1 and min(v) > 0
             for v in row["examples_per_second"].values())
  assert "| mixed_bfloat16 | 16 | off |" in proc.stdout
  proc = run_in_process("benchmark.py", "--precisions=float64")
  assert proc.returncode == 2
  assert "--precisions: 'float64' is not one of" in proc.stderr
