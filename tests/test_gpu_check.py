"""scripts/gpu_check.py: its path on a machine without GPUs (this one), and
its table and exit status for passing, failing and hanging checks."""

import sys

import pytest

from conftest import run_in_process

import gpu_check  # scripts/gpu_check.py (conftest puts scripts/ on the path)


@pytest.mark.slow
def test_without_gpus_it_says_so_runs_the_cpu_check_and_exits_0(tmp_path):
  proc = run_in_process("gpu_check.py", f"--work_dir={tmp_path}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout
  assert "TensorFlow " in out and "driver: " in out and "NCCL: " in out
  assert "no GPU visible to TensorFlow: the GPU checks are skipped" in out
  assert "| smoke config on the CPU | PASS |" in out
  assert out.strip().endswith(f"all 1 checks passed (runs in {tmp_path})")
  assert (tmp_path / "cpu" / "metrics.json").exists()  # It really trained.


def test_the_gpu_checks_a_gpu_machine_gets(tmp_path):
  one = gpu_check.checks_for([{"name": "A100", "compute_capability": (8, 0)}],
                             str(tmp_path))
  assert [c.name for c in one] == [
      "smoke config, one GPU (auto XLA)", "MirroredStrategy over 1 GPU(s)",
      "mixed_float16, one GPU", "mixed_bfloat16, one GPU",
      "equivalence with fit, one GPU", "benchmark, loop vs fit at batch 256"]
  two_t4 = gpu_check.checks_for(
      [{"name": "T4", "compute_capability": (7, 5)}] * 2, str(tmp_path))
  names = [c.name for c in two_t4]
  assert "mixed_bfloat16, one GPU" not in names  # Needs compute 8.0.
  assert "two local workers, one GPU each" in names
  assert "equivalence with fit, 2 GPUs (same strategy)" in names


def test_failing_and_hanging_checks_fail_the_table(tmp_path):
  checks = [
      gpu_check.Check("passes", (sys.executable, "-c", "print('fine')")),
      gpu_check.Check("fails", (sys.executable, "-c",
                                "import sys; sys.exit('error: broken')")),
      gpu_check.Check("hangs", (sys.executable, "-c",
                                "import time; time.sleep(60)")),
  ]
  outcomes = gpu_check.run_checks(checks, timeout_seconds=2,
                                  log=lambda line: None)
  assert [o.result for o in outcomes] == ["PASS", "FAIL", "TIMEOUT"]
  assert outcomes[0].detail == "fine"
  assert outcomes[1].detail == "exit 1: error: broken"
  text = gpu_check.table(outcomes)
  assert "| fails | FAIL |" in text and "| hangs | TIMEOUT |" in text
