"""scripts/benchmark.py and its FLOP count (no timings are asserted)."""

import json

import pytest

from conftest import run_in_process, write_image_folder
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
  # Not CIFAR's shape: 24x24 images of 3 classes, 24 of them.
  data = ["--dataset=folder", "--data_dir=" + write_image_folder(
      str(tmp_path / "images"), per_class=8, size=24)]
  out = tmp_path / "bench.json"
  proc = run_in_process("benchmark.py", *data, "--batch_sizes=8",
                        "--xla_batch_sizes=", "--windows=1",
                        "--window_examples=80",
                        "--matmul_size=256", "--precisions=mixed_bfloat16",
                        "--compare_fused_batch_norm", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out.read_text())
  forward = {  # As for the ConvNet on 32x32 (above), on 24x24, 3 classes.
      "conv1": 2 * 22 * 22 * 3 * 3 * 3 * 32,
      "conv2": 2 * 9 * 9 * 3 * 3 * 32 * 64,
      "conv3": 2 * 2 * 2 * 3 * 3 * 64 * 64,
      "dense1": 2 * 256 * 64,
      "logits": 2 * 64 * 3,
  }
  assert report["flops_per_example"] == (3 * sum(forward.values()) -
                                         forward["conv1"])
  assert set(report["matmul_gflops"]) == {"mixed_bfloat16"}
  assert report["matmul_gflops"]["mixed_bfloat16"] > 0
  (row,) = report["results"]
  assert row["batch_size"] == 8 and row["window_steps"] == 10
  assert row["precision"] == "mixed_bfloat16"
  assert set(row["examples_per_second"]) == {
      "loop", "loop_synthetic", "fit_default", "fit_matched",
      "loop_other_batch_norm"}
  assert all(len(v) == 1 and min(v) > 0
             for v in row["examples_per_second"].values())
  assert "| mixed_bfloat16 | 8 | off |" in proc.stdout
  assert "| loop, the other batch norm, ex/s | other ÷ loop |" in proc.stdout


@pytest.mark.parametrize("flag, message", [
    ("--precisions=float64", "--precisions: 'float64' is not one of"),
    ("--batch_sizes=0", "'0' is not a positive batch size"),
    ("--xla_batch_sizes=big", "'big' is not a positive batch size"),
    ("--batch_sizes=64", "global batch size 64 exceeds the 32 training"),
])
def test_benchmark_script_refuses_bad_settings_in_one_line(flag, message):
  proc = run_in_process("benchmark.py", "--synthetic_train_size=32", flag)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert message in proc.stderr, proc.stderr
