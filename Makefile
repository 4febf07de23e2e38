# Set-up and everyday commands. `make train` and `make test` do all set-up on
# a fresh machine with Python >= 3.10: they create .venv and install the
# project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLAGS ?= configs/cifar10.flags
ARGS ?=

.PHONY: install train smoke test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) scripts/train_loop.py --flagfile=$(FLAGS) $(ARGS)

smoke: install
	$(PY) scripts/train_loop.py --flagfile=configs/smoke.flags $(ARGS)

test: install
	$(PY) -m pytest tests

# Loop vs model.fit throughput (BENCHMARKS.md). Real data:
# make bench ARGS="--dataset=folder --data_dir=/tmp/cifar10-jpeg"
bench: install
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
