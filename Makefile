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
# mlflow server: loopback only, and Host headers / CORS origins limited to it (DNS rebinding).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_ALLOWED_HOSTS ?= localhost,127.0.0.1,localhost:$(MLFLOW_PORT),127.0.0.1:$(MLFLOW_PORT)
MLFLOW_CORS_ORIGINS ?= http://localhost:$(MLFLOW_PORT),http://127.0.0.1:$(MLFLOW_PORT)
MLFLOW_STORE ?= $(CURDIR)/mlflow
BENCH_ARGS ?=
DEMO_DIR ?= artifacts/demo
DEMO_PORT ?= $(PORT)
DEMO_RUN ?= make run PORT=$(DEMO_PORT)
DEMO_TEST ?= make test
SCREENSHOT_IMAGE ?= $(DEMO_DIR)/ankle-boot.png
SOAK_ARGS ?=
# make recipe-search: recipes trained at once (each with 1 torch thread), and extra arguments
# (e.g. RECIPE_ARGS="--only w32_flip_15,deep24_pad2_erase_13").
RECIPE_PARALLEL ?= 2
RECIPE_ARGS ?=
# e.g. BENCH_NICE="nice -n -5" (as root) to keep the benchmark ahead of background jobs.
BENCH_NICE ?=
APT_PACKAGES := dataset-fashion-mnist wrk
# promtool checks the Prometheus alert rules in the tests
APT_PACKAGES += prometheus
# headless browser test of the Swagger UI, and make demo (terminal recording → GIF)
APT_PACKAGES += chromium chromium-driver tmux imagemagick fonts-dejavu-core
# Containers without a Docker engine or a registry (docs/deployment.md): podman + runc, debootstrap
# for the offline base, podman-compose for docker-compose.yaml.
CONTAINER_APT_PACKAGES := podman buildah runc debootstrap podman-compose
# `docker compose` when a Docker engine answers, else podman-compose.
COMPOSE ?= $(shell docker info >/dev/null 2>&1 && echo "docker compose" || echo podman-compose)
# MLFLOW_DB=postgres adds docker-compose.postgres.yaml (PostgreSQL instead of sqlite).
MLFLOW_DB ?= sqlite
COMPOSE_PROJECT ?= fashion-serve
COMPOSE_FILES := -f docker-compose.yaml $(if $(filter postgres,$(MLFLOW_DB)),-f docker-compose.postgres.yaml,)
# Models live in BentoML's own store (BENTOML_HOME if exported, else ~/bentoml), so plain
# `bentoml serve service:Classifier`, `bentoml models list` and `bentoml build` see them.

.PHONY: setup system-deps data train fit promote import serve run test lint typecheck pytest mlflow sweep bench bench-serve recipe-search openapi soak screenshots demo alerts alert-rules clean help
.PHONY: container-deps container-base container container-smoke mlflow-image postgres-image compose-up compose-down

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

recipe-search: setup  ## train configs/recipes.yaml (GPU if any; hours on CPU), priced in CPU hours → docs/recipe_search.md
	$(PY) -m bench.recipe_search --device auto --parallel $(RECIPE_PARALLEL) --cpu-throughput \
	  --output docs/recipe_search.md $(RECIPE_ARGS)

soak: setup  ## /predict + /batch_predict at concurrency 64 for configs/soak.yaml's duration (SOAK_ARGS=--tiny)
	$(PY) -m bench.soak $(SOAK_ARGS)

openapi: setup  ## export the service's OpenAPI schema to docs/openapi.json (no model needed)
	$(PY) scripts/export_openapi.py

screenshots: setup  ## Swagger UI in headless Chromium predicting with the imported model → docs/swagger-*.png
	$(PY) scripts/demo.py sample-image $(SCREENSHOT_IMAGE)
	SWAGGER_BENTOML_HOME=$${BENTOML_HOME:-$$HOME/bentoml} SWAGGER_IMAGE=$(SCREENSHOT_IMAGE) SWAGGER_SCREENSHOT_DIR=docs \
	  $(PY) -m pytest tests/test_swagger_ui.py -q -p no:cacheprovider

demo: setup  ## record `make run` and `make test` (real runs, tmux) + Swagger screenshots → docs/demo.gif
	$(PY) scripts/demo.py sample-image $(SCREENSHOT_IMAGE)
	$(PY) scripts/demo.py record --out $(DEMO_DIR)/run --ready-url http://$(HOST):$(DEMO_PORT)/readyz \
	  --probe-image $(SCREENSHOT_IMAGE) -- $(DEMO_RUN)
	$(MAKE) screenshots
	$(PY) scripts/demo.py record --out $(DEMO_DIR)/test -- $(DEMO_TEST)
	$(PY) scripts/demo.py assemble --out docs/demo.gif $(DEMO_DIR)/run \
	  docs/swagger-endpoints.png docs/swagger-predict.png $(DEMO_DIR)/test

alerts: setup  ## evaluate configs/alerts.yaml over the service's logs (exit 1 when an alert fires)
	$(PY) -m train alerts

alert-rules: setup  ## write deploy/prometheus/alerts.yml from configs/alerts.yaml
	$(PY) -m train alert-rules

mlflow: setup  ## MLflow UI/server on 127.0.0.1 over the embedded store (allowed hosts: loopback)
	$(VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	  --allowed-hosts '$(MLFLOW_ALLOWED_HOSTS)' --cors-allowed-origins '$(MLFLOW_CORS_ORIGINS)' \
	  --backend-store-uri sqlite:///$(MLFLOW_STORE)/mlflow.db \
	  --artifacts-destination $(MLFLOW_STORE)/artifacts

container-deps:  ## Debian's podman, buildah, runc, debootstrap, podman-compose (when apt is there)
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(CONTAINER_APT_PACKAGES)"

container-base: setup container-deps  ## the offline Debian base image (debootstrap; cached by tag)
	$(PY) scripts/container.py base

container: setup container-deps  ## bentoml build + containerize the imported model → fashion-serve:latest
	$(PY) scripts/container.py build

container-smoke: setup container-deps  ## build, run and check a throw-away image of a tiny model; print size, start-to-ready
	$(PY) scripts/container.py smoke --tiny

mlflow-image: setup container-deps  ## the MLflow server image docker-compose.yaml runs
	$(PY) scripts/container.py mlflow-image

postgres-image: setup container-deps  ## Debian's PostgreSQL on the same base (MLFLOW_DB=postgres)
	$(PY) scripts/container.py postgres-image

compose-up: container mlflow-image $(if $(filter postgres,$(MLFLOW_DB)),postgres-image,)  ## the service + MLflow server (MLFLOW_DB=postgres for PostgreSQL) on 127.0.0.1
	CONTAINERS_CONF=$$($(PY) scripts/container.py conf) $(COMPOSE) -p $(COMPOSE_PROJECT) $(COMPOSE_FILES) up -d

compose-down:  ## stop and remove the compose services (volumes are kept)
	CONTAINERS_CONF=$$($(PY) scripts/container.py conf) $(COMPOSE) -p $(COMPOSE_PROJECT) $(COMPOSE_FILES) down

lint: setup  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup  ## mypy --strict
	$(VENV)/bin/mypy

pytest: setup  ## the test suite with coverage
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=90

test: setup lint typecheck pytest container-smoke  ## the whole check: set up, lint, types, tests, container

clean:  ## remove build outputs (keeps mlflow/, models/ and the BentoML store)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
