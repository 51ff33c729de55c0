# Two entry points a newcomer needs (README "Quick start"); each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup lock demo test test-all lint bench

setup: $(VENV)/.installed

# containers/install.sh is the one installer (the Docker and Apptainer images run it too).
$(VENV)/.installed: pyproject.toml containers/constraints.txt containers/install.sh
	containers/install.sh $(VENV) editable
	touch $@

# Re-pin containers/constraints.txt to what $(VENV) has now (after a deliberate upgrade).
lock: setup
	$(PY) containers/lock.py

# The whole DVC pipeline on the built-in dataset.
demo: setup
	dvc repro

# Fast tests (slow end-to-end ones are marked; `make test-all` runs them too).
test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check src stages tests bench containers

bench: setup
	$(PY) bench/bench_metrics.py
	$(PY) bench/bench_speed.py --repeats 3 --out bench/out/speed.md
	$(PY) bench/bench_gpu_step.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_bootstrap_coverage.py
