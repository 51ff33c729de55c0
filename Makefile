# Two entry points a newcomer needs (README "Quick start"); each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-all lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The whole DVC pipeline on the built-in dataset.
demo: setup
	dvc repro

# Fast tests (slow end-to-end ones are marked; `make test-all` runs them too).
test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check src stages tests bench

bench: setup
	$(PY) bench/bench_metrics.py
	$(PY) bench/bench_speed.py --out bench/out/speed.md
	$(PY) bench/bench_gpu_step.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_bootstrap_coverage.py
