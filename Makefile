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
# The project's embedded MLflow store (mlflow.db + artifacts/): configs/tracking.yaml's store_dir,
# read through the settings loader when `make mlflow` runs. Not MLflow 3's default ./mlflow.db,
# so plain `mlflow ui` in this folder opens an empty store; `make mlflow` opens this one.
MLFLOW_STORE ?=
mlflow_store = $(or $(MLFLOW_STORE),$(shell $(PY) -c 'from train.config import load_settings; print(load_settings().tracking.store_path())'),$(error cannot read tracking.store_dir: run make setup, check configs/tracking.yaml))
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
# `make run` needs only the data set (without apt, torchvision downloads it: see data.path).
RUN_APT_PACKAGES := dataset-fashion-mnist
# The test tools: wrk (make bench/bench-serve/soak and their tests), prometheus (promtool for the
# alert-rule tests) and prometheus-alertmanager (make monitoring, the alerting test), chromium + its driver (the Swagger UI test, make screenshots), tmux,
# imagemagick and fonts-dejavu-core (make demo and its test).
MONITORING_APT_PACKAGES := prometheus prometheus-alertmanager
TEST_APT_PACKAGES := wrk $(MONITORING_APT_PACKAGES) chromium chromium-driver tmux imagemagick fonts-dejavu-core
# Containers without a Docker engine or a registry (docs/deployment.md): podman + runc, debootstrap
# for the offline base, podman-compose for docker-compose.yaml.
CONTAINER_APT_PACKAGES := podman buildah runc debootstrap podman-compose
# Installs the Debian packages in $(1) that are missing, as root or through sudo; without apt-get,
# or as a user with no sudo, it prints what is missing ($(2): what else to do) and goes on.
define apt_install
@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -z "$$missing" ]; then exit 0; fi; \
if ! command -v apt-get >/dev/null; then echo "note: no apt-get; install$$missing yourself$(2)"; exit 0; fi; \
SUDO=""; if [ "$$(id -u)" != 0 ]; then \
  if ! command -v sudo >/dev/null; then echo "note: not root and no sudo; install$$missing yourself$(2)"; exit 0; fi; \
  SUDO=sudo; fi; \
$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing
endef
# `docker compose` when a Docker engine answers, else podman-compose.
COMPOSE ?= $(shell docker info >/dev/null 2>&1 && echo "docker compose" || echo podman-compose)
# MLFLOW_DB=postgres adds docker-compose.postgres.yaml (PostgreSQL instead of sqlite).
MLFLOW_DB ?= sqlite
COMPOSE_PROJECT ?= fashion-serve
COMPOSE_FILES := -f docker-compose.yaml $(if $(filter postgres,$(MLFLOW_DB)),-f docker-compose.postgres.yaml,)
# Models live in BentoML's own store (BENTOML_HOME if exported, else ~/bentoml), so plain
# `bentoml serve service:Classifier`, `bentoml models list` and `bentoml build` see them.

.PHONY: setup setup-dev system-deps test-deps monitoring-deps data train fit promote import serve run test lint typecheck pytest mlflow mlflow-ui sweep bench bench-serve bench-loaders recipe-search openapi notebooks soak screenshots demo alerts alert-rules monitoring clean help
.PHONY: container-deps container-base container container-smoke mlflow-image postgres-image monitoring-image compose-up compose-down

help:  ## list targets
	@grep -E '^[a-z][a-z -]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: system-deps $(VENV)/.installed-run  ## .venv with the runtime packages (pip install -e .) and Debian's Fashion-MNIST

setup-dev: setup test-deps $(VENV)/.installed-dev  ## setup + the test tools: the dev extra and the Debian packages tests use

system-deps:  ## Debian's Fashion-MNIST (make run's only Debian package), when apt is there
	$(call apt_install,$(RUN_APT_PACKAGES), or set data.path)

test-deps:  ## the Debian packages only tests, bench, soak, screenshots and demo use, when apt is there
	$(call apt_install,$(TEST_APT_PACKAGES),)

monitoring-deps:  ## Debian's Prometheus and Alertmanager only (make monitoring), when apt is there
	$(call apt_install,$(MONITORING_APT_PACKAGES),)

# Two stamps: the runtime install (make run) and the dev extra on top (make test and the tools).
$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
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

run: setup train promote import serve  ## the main job: set up (runtime only), train, promote, import, serve

bench: setup-dev  ## every performance comparison → docs/benchmarks.md/.png/.json (BENCH_ARGS=--tiny)
	BENCH_NICE="$(BENCH_NICE)" $(BENCH_NICE) $(PY) -m bench.suite $(BENCH_ARGS)

bench-serve: setup-dev  ## benchmark the imported model under load → docs/benchmarks-serving.md (BENCH_ARGS=--tiny)
	$(PY) -m bench.serving $(BENCH_ARGS)

bench-loaders: setup-dev  ## memory vs stream ImageFolder loader: peak RSS and images/s on 20k generated JPEGs (LOADER_ARGS=--images 2000)
	$(PY) -m bench.data_loaders $(LOADER_ARGS)

recipe-search: setup  ## train configs/recipes.yaml (GPU if any; hours on CPU), priced in CPU hours → docs/recipe_search.md
	$(PY) -m bench.recipe_search --device auto --parallel $(RECIPE_PARALLEL) --cpu-throughput \
	  --output docs/recipe_search.md $(RECIPE_ARGS)

soak: setup-dev  ## /predict + /batch_predict at concurrency 64 for configs/soak.yaml's duration (SOAK_ARGS=--tiny)
	$(PY) -m bench.soak $(SOAK_ARGS)

openapi: setup  ## export the service's OpenAPI schema to docs/openapi.json (no model needed)
	$(PY) scripts/export_openapi.py

notebooks: setup-dev  ## execute notebooks/*.ipynb in place on the real data and MLflow runs (outputs committed)
	$(PY) scripts/run_notebooks.py

screenshots: setup-dev  ## Swagger UI in headless Chromium predicting with the imported model → docs/swagger-*.png
	$(PY) scripts/demo.py sample-image $(SCREENSHOT_IMAGE)
	SWAGGER_BENTOML_HOME=$${BENTOML_HOME:-$$HOME/bentoml} SWAGGER_IMAGE=$(SCREENSHOT_IMAGE) SWAGGER_SCREENSHOT_DIR=docs \
	  $(PY) -m pytest tests/test_swagger_ui.py -q -p no:cacheprovider

demo: setup-dev  ## record `make run` and `make test` (real runs, tmux) + Swagger screenshots → docs/demo.gif
	$(PY) scripts/demo.py sample-image $(SCREENSHOT_IMAGE)
	$(PY) scripts/demo.py record --out $(DEMO_DIR)/run --ready-url http://$(HOST):$(DEMO_PORT)/readyz \
	  --probe-image $(SCREENSHOT_IMAGE) -- $(DEMO_RUN)
	$(MAKE) screenshots
	$(PY) scripts/demo.py record --out $(DEMO_DIR)/test -- $(DEMO_TEST)
	$(PY) scripts/demo.py assemble --out docs/demo.gif $(DEMO_DIR)/run \
	  docs/swagger-endpoints.png docs/swagger-predict.png $(DEMO_DIR)/test

alerts: setup  ## evaluate configs/alerts.yaml over the service's logs (exit 1 when an alert fires)
	$(PY) -m train alerts

alert-rules: setup  ## write deploy/prometheus/alerts.yml and deploy/k8s/prometheusrule.yaml from configs/alerts.yaml
	$(PY) -m train alert-rules

monitoring: setup monitoring-deps  ## Prometheus scraping the service at HOST:PORT, with the alert rules, + Alertmanager (loopback; Ctrl-C stops)
	FASHION_SERVE_MONITORING__SCRAPE__TARGET=$(HOST):$(PORT) $(PY) scripts/monitoring.py

mlflow mlflow-ui: setup  ## MLflow UI (127.0.0.1, MLFLOW_PORT) over the project's store mlflow/; plain `mlflow ui` opens ./mlflow.db
	$(VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	  --allowed-hosts '$(MLFLOW_ALLOWED_HOSTS)' --cors-allowed-origins '$(MLFLOW_CORS_ORIGINS)' \
	  --backend-store-uri 'sqlite:///$(mlflow_store)/mlflow.db' \
	  --artifacts-destination '$(mlflow_store)/artifacts'

container-deps:  ## Debian's podman, buildah, runc, debootstrap, podman-compose (when apt is there)
	$(call apt_install,$(CONTAINER_APT_PACKAGES),)

container-base: setup-dev container-deps  ## the offline Debian base image (debootstrap; cached by tag)
	$(PY) scripts/container.py base

container: setup-dev container-deps  ## bentoml build + containerize the imported model → fashion-serve:latest
	$(PY) scripts/container.py build

container-smoke: setup-dev container-deps  ## build, run and check a throw-away image of a tiny model; print size, start-to-ready
	$(PY) scripts/container.py smoke --tiny

mlflow-image: setup-dev container-deps  ## the MLflow server image docker-compose.yaml runs
	$(PY) scripts/container.py mlflow-image

postgres-image: setup-dev container-deps  ## Debian's PostgreSQL on the same base (MLFLOW_DB=postgres)
	$(PY) scripts/container.py postgres-image

monitoring-image: setup-dev container-deps  ## Debian's Prometheus + Alertmanager on the same base (compose's monitoring services)
	$(PY) scripts/container.py monitoring-image

compose-up: container mlflow-image monitoring-image $(if $(filter postgres,$(MLFLOW_DB)),postgres-image,)  ## the service, MLflow server, Prometheus + Alertmanager (MLFLOW_DB=postgres for PostgreSQL) on 127.0.0.1
	$(PY) scripts/monitoring.py compose-config
	CONTAINERS_CONF=$$($(PY) scripts/container.py conf) $(COMPOSE) -p $(COMPOSE_PROJECT) $(COMPOSE_FILES) up -d

compose-down:  ## stop and remove the compose services (volumes are kept)
	CONTAINERS_CONF=$$($(PY) scripts/container.py conf) $(COMPOSE) -p $(COMPOSE_PROJECT) $(COMPOSE_FILES) down

lint: setup-dev  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup-dev  ## mypy --strict
	$(VENV)/bin/mypy

pytest: setup-dev  ## the test suite with coverage
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=90

test: setup-dev lint typecheck pytest container-smoke  ## the whole check: set up (runtime + test tools), lint, types, tests, container

clean:  ## remove build outputs (keeps mlflow/, models/ and the BentoML store)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
