# The few verbs a person needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help setup tools browser test test-unit test-integration test-gpu lint crds image cluster-up cluster-down demo bench chaos

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 20

$(BIN)/kubemeter: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/kubemeter ## create .venv with kubemeter and its test tools

tools: ## apt packages (runc, busybox-static, openssl, chromium, Java, Maven) if root, then the Go test binaries and Prometheus (cached)
	-tools/system-packages.sh
	tools/build.sh

test: setup tools browser ## the whole suite: lint, types, unit and integration tests on the local control plane
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: setup ## unit tests only (no control plane)
	$(BIN)/pytest -m "not integration and not prometheus and not gpu" $(PYTEST_ARGS)

test-integration: setup tools ## integration tests on the local control plane
	$(BIN)/pytest -m "integration or prometheus" $(PYTEST_ARGS)

test-gpu: setup ## the real-NVML tests; needs an NVIDIA GPU and driver
	$(BIN)/pytest -m gpu $(PYTEST_ARGS)

browser: ## headless Chromium for the report's browser tests (Debian's chromium; installed when root)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
	  >/dev/null; } || { echo "the report's browser tests need chromium: apt-get install chromium"; exit 1; }

lint: setup ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

crds: setup ## regenerate crds/, the chart's copy and docs/crd-reference.md from the pydantic models
	$(BIN)/python -m kubemeter_operator.crdgen
	cp crds/*.yaml charts/kubemeter/crds/
	$(BIN)/python -m kubemeter_operator.docgen

image: setup ## the Dockerfile's image built without Docker (OCI archive, cached by content hash)
	$(BIN)/python -m tools.image.build

cluster-up: setup tools ## start the local control plane (kwok nodes, and the real node real-0 when root) in the background; kubeconfig in .kube/config
	@mkdir -p .state
	@nohup $(BIN)/python -m testbed.controlplane up --real-node > .state/cluster-up.log 2>&1 &
	@for i in $$(seq 1 240); do \
	  if grep -q "control plane up" .state/cluster-up.log 2>/dev/null; then cat .state/cluster-up.log; \
	    echo "try: kubectl --kubeconfig .kube/config get nodes"; exit 0; fi; \
	  if ! pgrep -f "testbed.controlplane up" >/dev/null; then cat .state/cluster-up.log; exit 1; fi; \
	  sleep 0.5; done; echo "control plane not up after 120 s; see .state/cluster-up.log"; exit 1

cluster-down: ## stop the local control plane and remove its state
	@$(BIN)/python -m testbed.controlplane down

bench: setup ## every benchmark side by side; prints a table, writes bench/results/latest.json
	$(BIN)/python -m bench.run $(BENCH_ARGS)

demo: setup tools ## the main job on local defaults: cluster, operator, agents, gateway, sink, then a chargeback table
	$(BIN)/python -m demo.run $(DEMO_ARGS)

chaos: setup tools ## end-to-end fault suite on the local stack; table of faults x outcome, chaos/results/latest.json
	$(BIN)/python -m chaos.run $(CHAOS_ARGS)
