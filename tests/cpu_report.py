"""Where the suite's time goes, in CPU seconds per test (BENCHMARKS.md, "The
test suite's time").

Wall seconds of a test say little on two busy cores (three pytest workers and
their children share them); CPU seconds add up to the suite's cost whatever
runs beside. A pytest plugin (conftest.py loads it): with ``--cpu-report=FILE``
it appends one JSON line a test to FILE: the test process's own CPU seconds
during the test (``self``), those of the processes the test started and
waited for, with theirs (``children``), and wall seconds; a module-scoped
fixture's cost lands on the first test that uses it::

  .venv/bin/python -m pytest --cpu-report=cpu.jsonl -n 3 --dist loadfile tests

Then, a table by file and the costliest tests::

  .venv/bin/python tests/cpu_report.py cpu.jsonl
"""

import collections
import json
import os
import resource
import sys
import time

import pytest


def pytest_addoption(parser):
  parser.addoption("--cpu-report", metavar="FILE", default=None,
                   help="append each test's CPU seconds to FILE (JSON lines)")


def _cpu_seconds(who) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  path = item.config.getoption("--cpu-report")
  if not path:
    yield
    return
  own = _cpu_seconds(resource.RUSAGE_SELF)
  children = _cpu_seconds(resource.RUSAGE_CHILDREN)
  started = time.perf_counter()
  yield
  row = {"test": item.nodeid,
         "self": _cpu_seconds(resource.RUSAGE_SELF) - own,
         "children": _cpu_seconds(resource.RUSAGE_CHILDREN) - children,
         "wall": time.perf_counter() - started}
  # One short line in append mode: the workers' lines do not interleave.
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def summarize(rows: list[dict], top: int = 15) -> str:
  """A Markdown table of CPU seconds by test file, then the ``top`` costliest
  tests."""
  by_file = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for row in rows:
    totals = by_file[row["test"].split("::")[0]]
    totals[0] += row["self"]
    totals[1] += row["children"]
    totals[2] += 1
  lines = ["| file | tests | CPU s | in the test process | in processes it started |",
           "|---|---:|---:|---:|---:|"]
  for name, (own, children, count) in sorted(
      by_file.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
    lines.append(f"| {name} | {count} | {own + children:.1f} | {own:.1f} | "
                 f"{children:.1f} |")
  own = sum(r["self"] for r in rows)
  children = sum(r["children"] for r in rows)
  lines.append(f"| all | {len(rows)} | {own + children:.1f} | {own:.1f} | "
               f"{children:.1f} |")
  lines += ["", f"The {top} costliest tests (CPU s):"]
  for row in sorted(rows, key=lambda r: -(r["self"] + r["children"]))[:top]:
    lines.append(f"  {row['self'] + row['children']:6.1f}  {row['test']}")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
    sys.exit("usage: python tests/cpu_report.py CPU_REPORT.jsonl")
  with open(sys.argv[1]) as report:
    print(summarize([json.loads(line) for line in report if line.strip()]))
