"""Rules every entry-point script shares (scripts/cli_common.py): --json_out
is checked before any work, and a report that cannot be written is one
error line, with the file left as it was."""

import os

import pytest

from conftest import run_in_process, write_image_folder
from research import files
from research.errors import UserError

# Each script that reports to --json_out, with flags that are otherwise
# valid: the check must come before any of its work.
JSON_OUT_SCRIPTS = {
    "benchmark.py": ["--dataset=synthetic"],
    "bench_distributed.py": [],
    "evaluate.py": ["--model_dir=/no/such/run"],
    "seed_fit_gap.py": [],
    "time_to_accuracy.py": [],
    "verify_equivalence.py": [],
}


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: "), line
  return line


@pytest.mark.parametrize("script", sorted(JSON_OUT_SCRIPTS))
@pytest.mark.parametrize("where", ["missing_folder", "a_folder"])
def test_a_json_out_that_cannot_be_written_is_refused_first(tmp_path, script,
                                                             where):
  path = (tmp_path / "no" / "such.json" if where == "missing_folder"
          else tmp_path)
  proc = run_in_process(script, *JSON_OUT_SCRIPTS[script],
                        f"--json_out={path}")
  line = _one_error_line(proc)
  assert f"--json_out={path} is not a file in an existing, writable " \
         f"folder" in line, line
  assert os.listdir(tmp_path) == []


def test_a_failed_json_write_is_a_user_error_and_keeps_the_file(tmp_path):
  path = tmp_path / "report.json"
  files.write_json(str(path), {"a": 1})
  before = path.read_bytes()
  with pytest.raises(UserError) as e:
    files.write_json(str(path), {"b": Unwritable()})
  assert "could not write" in str(e.value) and str(path) in str(e.value)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["report.json"]  # No .tmp left.
  with pytest.raises(UserError, match="No such file or directory"):
    files.write_json(str(tmp_path / "gone" / "r.json"), {})


class Unwritable:
  """Fails the way a full disk does, halfway through the write."""

  def __str__(self):
    raise OSError(28, "No space left on device")


def test_bench_distributed_refuses_an_odd_batch_before_training():
  line = _one_error_line(run_in_process("bench_distributed.py",
                                        "--batch_size=63"))
  assert "--batch_size must be even" in line


@pytest.mark.parametrize("pixels", ["pil", "tf"])
def test_seed_fit_gap_names_a_folder_that_is_not_an_image_folder(tmp_path,
                                                                 pixels):
  data_dir = write_image_folder(str(tmp_path / "images"), per_class=2)
  os.rename(os.path.join(data_dir, "test"), os.path.join(data_dir, "tests"))
  line = _one_error_line(run_in_process(
      "seed_fit_gap.py", f"--data_dir={data_dir}", f"--pixels={pixels}"))
  assert "has no test/ subfolder" in line, line


def test_seed_fit_gap_refuses_a_batch_larger_than_the_data(tmp_path):
  data_dir = write_image_folder(str(tmp_path / "images"), per_class=2)
  line = _one_error_line(run_in_process(
      "seed_fit_gap.py", f"--data_dir={data_dir}", "--pixels=tf",
      "--order=ours", "--batch_size=64"))
  assert "exceeds the" in line, line
