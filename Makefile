# kubeonnx: the two set-up commands are `make demo` (the whole flow) and `make check` (the tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv binaries lint unit e2e check cluster-up cluster-down dev dev-down models demo demo-down peers bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[operator,runtime,dev]'
	touch $@

venv: $(VENV)/.installed

binaries:            ## build the pinned control-plane binaries (cached)
	bash e2e/build-binaries.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile.operator Dockerfile.runtime

unit: venv binaries  ## unit and runtime integration tests (no cluster; helm for the chart tests)
	$(VENV)/bin/pytest tests

# Built for the e2e suite only, so that `make demo` never waits for them.
E2E_BINARIES := prometheus keda metrics-server

e2e: venv binaries   ## the e2e suite against the local control plane (or E2E_KUBECONFIG)
	bash e2e/build-binaries.sh $(E2E_BINARIES) >/dev/null
	$(VENV)/bin/pytest e2e

check: lint unit e2e ## everything CI runs

cluster-up: venv binaries
	$(PY) -m e2e.cluster up

cluster-down: venv
	$(PY) -m e2e.cluster down

dev: venv binaries   ## cluster, CRDs and the operator (a process); prints KUBECONFIG and what next
	$(PY) -m e2e.cluster dev

dev-down: venv       ## stops everything `make dev` started, the operator included (only make dev's)
	$(PY) -m e2e.cluster down dev

models: venv
	$(PY) -m e2e.generate_models models

demo: venv           ## the whole flow on an embedded default (README's first command)
	$(PY) -m e2e.demo

demo-down: venv      ## after a killed demo: stops its cluster, operator and runtime (only the demo's)
	$(PY) -m e2e.cluster down demo

# The servers a user would pick instead of kubeonnx (benchmarks/peers_bench.py), each in its
# own virtual environment with the onnxruntime kubeonnx is measured with. A peer that does not
# install is left without its .installed: the benchmark names it, with pip's log.
PEERS := mlserver kserve pytriton bentoml litserve
PEER_PKG_mlserver := mlserver==1.7.1
PEER_PKG_kserve := kserve==0.21.0
PEER_PKG_pytriton := nvidia-pytriton==0.7.0
PEER_PKG_bentoml := bentoml==1.4.40
PEER_PKG_litserve := litserve==0.2.19
PEER_ORT := onnxruntime==1.32.0 numpy

benchmarks/.venv-peer-%/.installed:
	python3 -m venv benchmarks/.venv-peer-$*
	if benchmarks/.venv-peer-$*/bin/pip install --quiet $(PEER_PKG_$*) $(PEER_ORT) \
	    >benchmarks/.venv-peer-$*/pip.log 2>&1; then touch $@; \
	else echo "peer $*: pip failed (benchmarks/.venv-peer-$*/pip.log):"; \
	    tail -5 benchmarks/.venv-peer-$*/pip.log; fi

peers: $(foreach p,$(PEERS),benchmarks/.venv-peer-$(p)/.installed)  ## the peers' environments

bench: venv peers    ## runtime, peers, quota and operator benchmarks (docs/performance.md)
	command -v wrk >/dev/null || (apt-get install -y -qq wrk || sudo apt-get install -y -qq wrk)
	command -v valgrind >/dev/null || (apt-get install -y -qq valgrind || sudo apt-get install -y -qq valgrind)
	mkdir -p benchmarks/results
	$(PY) benchmarks/runtime_bench.py --out benchmarks/results/runtime.md
	$(PY) benchmarks/peers_bench.py --out benchmarks/results/peers.md
	$(PY) benchmarks/image_bench.py --out benchmarks/results/images.md
	$(PY) benchmarks/async_bench.py --out benchmarks/results/async.md
	$(PY) benchmarks/quota_bench.py --seconds 6 --concurrency 64 16 --out benchmarks/results/quota.md
	$(PY) benchmarks/instructions_bench.py --steps --out benchmarks/results/instructions.md
	$(PY) benchmarks/operator_bench.py --out benchmarks/results/operator.md
