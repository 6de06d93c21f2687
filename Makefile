# fashion-serve: `make run` (set up, train, promote, import, serve) and `make test` (set up, check, test).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?=
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG),)
PORT ?= 3000
HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
BENCH_ARGS ?=
# e.g. BENCH_NICE="nice -n -5" (as root) to keep the benchmark ahead of background jobs.
BENCH_NICE ?=
APT_PACKAGES := dataset-fashion-mnist wrk
export BENTOML_HOME ?= $(CURDIR)/bentoml_home

.PHONY: setup system-deps data train fit promote import serve run test lint typecheck pytest mlflow sweep bench bench-serve openapi clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: system-deps $(VENV)/.installed  ## create .venv and install everything (and Debian's Fashion-MNIST)

system-deps:  ## Debian packages the project uses, when apt is there
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "note: no apt-get; install$$missing yourself or set data.path"; exit 0; fi; \
	SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data: setup  ## write and log data set statistics
	$(PY) -m train data $(CONFIG_FLAG)

train fit: setup  ## train the default config (CONFIG=configs/presets/x.yaml to change)
	$(PY) -m train fit $(CONFIG_FLAG)

sweep: setup  ## hyper-parameter sweep (configs/sweep.yaml)
	$(PY) -m train sweep $(CONFIG_FLAG)

promote: setup  ## register the best run as @champion
	$(PY) -m train promote $(CONFIG_FLAG)

import: setup  ## export the champion to ONNX and save it in the BentoML store
	$(PY) -m train import $(CONFIG_FLAG)

serve: setup  ## serve the imported champion on $(HOST):$(PORT)
	$(VENV)/bin/bentoml serve service:Classifier --host $(HOST) --port $(PORT)

run: setup train promote import serve  ## the main job: set up, train, promote, import, serve

bench: setup  ## every performance comparison → docs/benchmarks.md/.png/.json (BENCH_ARGS=--tiny)
	BENCH_NICE="$(BENCH_NICE)" $(BENCH_NICE) $(PY) -m bench.suite $(BENCH_ARGS)

bench-serve: setup  ## benchmark the imported model under load → docs/benchmarks-serving.md (BENCH_ARGS=--tiny)
	$(PY) -m bench.serving $(BENCH_ARGS)

openapi: setup  ## export the service's OpenAPI schema to docs/openapi.json (no model needed)
	$(PY) scripts/export_openapi.py

mlflow: setup  ## MLflow UI/server on 127.0.0.1 over the embedded store
	$(VENV)/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlflow/artifacts

lint: setup  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup  ## mypy --strict
	$(VENV)/bin/mypy

pytest: setup  ## the test suite with coverage
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=90

test: setup lint typecheck pytest  ## the whole check: set up, lint, types, tests

clean:  ## remove build outputs (keeps mlflow/, models/ and the BentoML store)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
