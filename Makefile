# Everything a fresh machine needs: `make test` sets up and runs all checks, `make demo` runs
# the main job. Targets are idempotent; stamps in .stamps/ keep the warm path fast.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
# torch is pinned to the version the GPU check machine carries, so one source builds on both.
TORCH_SPEC ?= torch==2.11.0

.PHONY: all install system-deps cuda-check gpu-check bench k8s kueue crds lint test test-unit test-integration test-distributed test-e2e cluster-up cluster-down demo demo-down clean

all: test

$(STAMPS):
	mkdir -p $(STAMPS)

# setuptools below 82: torch 2.11 requires it.
$(STAMPS)/venv: pyproject.toml setup.py | $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=69,<82" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[operator,worker,dev]"
	touch $@ $(STAMPS)/native

# The native extension (CPU part always; CUDA/NCCL where a toolkit exists), rebuilt in place
# when its sources change.
NATIVE_SOURCES := $(shell find native -type f 2>/dev/null)
$(STAMPS)/native: $(STAMPS)/venv $(NATIVE_SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

install: $(STAMPS)/venv $(STAMPS)/native

# Compile-only check of the CUDA/NCCL sources with nvcc from PyPI (no GPU needed).
cuda-check: $(STAMPS)/cuda-check

$(STAMPS)/cuda-check: $(STAMPS)/native
	scripts/compile-cuda-check.sh
	touch $@

# On a machine with a GPU (torch, nvcc and NCCL installed, no registry needed).
gpu-check:
	scripts/gpu-check.sh

# Benchmarks print ratios measured side by side in one run (docs/benchmarks.md).
bench: system-deps install k8s
	$(BIN)/python benchmarks/placement_bench.py
	$(BIN)/python benchmarks/scheduler_compare.py
	$(BIN)/python benchmarks/allreduce_bench.py

# System packages the demo, benchmarks and tests use: Debian's prometheus (the server scrapes
# the demo's workers; promtool checks the alert rules) and iproute2 (ip, tc: the simulated nodes'
# network namespaces and shaped links).
SYSTEM_PACKAGES := prometheus:prometheus promtool:prometheus ip:iproute2 tc:iproute2
system-deps:
	@missing=$$(for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Control-plane binaries, built from the Go module proxy into a cache outside the repo.
k8s:
	scripts/build-k8s.sh

# The pinned Kueue manager and its CRDs (Kueue integration tests), in the same cache; the
# script returns at once when they are built.
kueue:
	scripts/build-kueue.sh

crds: install
	$(BIN)/python -m ddl_operator.api.crd --write

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install k8s kueue
	$(BIN)/pytest -q tests/integration

test-distributed: install
	$(BIN)/pytest -q tests/distributed

test-e2e: install k8s
	$(BIN)/pytest -q tests/e2e

# Every layer: unit, integration (control plane, kwok, helm), distributed (Gloo), e2e (local
# cluster, real training), gpu (skips without a GPU; DDL_TEST_GPU=1 makes it fail instead).
test: install k8s kueue system-deps lint cuda-check
	$(BIN)/pytest -q tests

cluster-up: system-deps install k8s
	$(BIN)/ddl-cluster up

cluster-down: install
	$(BIN)/ddl-cluster down

# The main job on the local cluster; `make demo-down` stops everything it started.
# `make demo DEMO=quick` trains the job to the end without scaling or deleting anything.
DEMO ?= story
demo: system-deps install k8s
	$(BIN)/ddl-cluster demo $(if $(filter quick,$(DEMO)),--quick)

demo-down: cluster-down

clean:
	rm -rf $(STAMPS) build *.egg-info
