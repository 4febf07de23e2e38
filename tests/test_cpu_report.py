"""tests/cpu_report.py: CPU seconds per test, the test process's and its
children's apart."""

import json
import os
import subprocess
import sys

from conftest import REPO
import cpu_report

SPIN = """
import subprocess, sys, time

def _spin(seconds):
  end = time.process_time() + seconds
  while time.process_time() < end:
    pass

def test_in_process():
  _spin(0.3)

def test_in_a_child():
  subprocess.run([sys.executable, "-c",
                  "import time\\nend = time.process_time() + 0.3\\n"
                  "while time.process_time() < end: pass"], check=True)
"""


def test_each_test_gets_its_own_and_its_childrens_cpu(tmp_path):
  (tmp_path / "test_spin.py").write_text(SPIN)
  out = tmp_path / "cpu.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "cpu_report",
       "-p", "no:cacheprovider", f"--cpu-report={out}", "test_spin.py"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "tests")))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = {r["test"]: r for r in map(json.loads, out.read_text().splitlines())}
  own, child = rows["test_spin.py::test_in_process"], \
      rows["test_spin.py::test_in_a_child"]
  assert own["self"] >= 0.3 and own["children"] < 0.1
  assert child["children"] >= 0.3 and child["self"] < 0.2
  assert own["wall"] >= 0.3

  table = cpu_report.summarize(list(rows.values()), top=1)
  lines = table.splitlines()
  assert lines[2].startswith("| test_spin.py | 2 | ")
  total = own["self"] + own["children"] + child["self"] + child["children"]
  assert lines[3] == (f"| all | 2 | {total:.1f} | "
                      f"{own['self'] + child['self']:.1f} | "
                      f"{own['children'] + child['children']:.1f} |")
  costliest = max(rows.values(), key=lambda r: r["self"] + r["children"])
  assert lines[-2:] == ["The 1 costliest tests (CPU s):",
                        f"  {costliest['self'] + costliest['children']:6.1f}"
                        f"  {costliest['test']}"]
