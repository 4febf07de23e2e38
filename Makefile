# Set-up and everyday commands. `make train` and `make test` do all set-up on
# a fresh machine with Python >= 3.10: they create .venv and install the
# project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLAGS ?= configs/cifar10.flags
ARGS ?=

# Three pytest workers (pytest-xdist) on two cores, since part of the time a
# worker waits on a process it started; a test file at a time each, so a file's
# shared fixtures (a reference run, a batch of equivalence cases) run once.
PYTEST := $(PY) -m pytest -n 3 --dist loadfile

.PHONY: install train smoke test test-fast bench bench-tta gpu-check clean

# uv (from PyPI) unpacks TensorFlow's ~600 MB of wheels and compiles their
# bytecode in parallel: about 25 s on 2 cores where pip takes about 50.
# (Compiled at install, as pip does: with PYTHONDONTWRITEBYTECODE set, as on
# this machine, every process would otherwise compile TensorFlow's Python
# again, doubling its start.) Where uv cannot be installed or reach an index,
# pip installs instead; INSTALLER=pip skips uv.
INSTALLER ?= uv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install -q uv && \
	    $(PY) -m uv pip install --compile-bytecode --python $(PY) \
	    -e '.[test]'; then :; \
	else $(PY) -m pip install -e '.[test]'; fi
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) scripts/train_loop.py --flagfile=$(FLAGS) $(ARGS)

smoke: install
	$(PY) scripts/train_loop.py --flagfile=configs/smoke.flags $(ARGS)

# The whole suite (what CI runs): 6-8 minutes on 2 cores on 2026-12-01, over the 5 we
# hold it to (README, "Tests").
test: install
	$(PYTEST) tests

# The inner development loop: the tests that run in the test process (under
# two minutes); leaves out what starts processes or trains for seconds (marked
# slow).
test-fast: install
	$(PYTEST) -m "not slow" tests

# Loop vs model.fit throughput (BENCHMARKS.md). Real data:
# make bench ARGS="--dataset=folder --data_dir=/tmp/cifar10-jpeg"
bench: install
	$(PY) scripts/benchmark.py $(ARGS)

# Time to accuracy: configs/cifar10.flags and configs/cifar10_fast.flags
# trained alternately, 3 seeds (BENCHMARKS.md). Real data:
# make bench-tta ARGS="-- --dataset=folder --data_dir=/tmp/cifar10-jpeg"
bench-tta: install
	$(PY) scripts/time_to_accuracy.py $(ARGS)

# On a GPU machine, after `.venv/bin/pip install -e '.[gpu]'`: the project's
# commands on its GPUs, as a pass/fail table (BUILD.md, "GPUs").
gpu-check: install
	$(PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
