# tunio: setup, build, tests, demo. Run as root (sudo) for `setup`, `test` and `demo`:
# they install Debian packages and the end-to-end tests need network namespaces and a TUN.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?= -q

# Debian packages the build and the tests need (the C stack links libzmq; `ip` builds the lab).
APT_PACKAGES := build-essential pkg-config libzmq3-dev iproute2 iperf3 python3-dev python3-venv

.PHONY: help setup apt venv build test test-unit test-vm lint demo clean distclean asan fuzz bench

help:
	@echo "make setup      install Debian packages (if missing), create $(VENV), install tunio"
	@echo "make build      (re)build the C stack in place"
	@echo "make test       setup + build + all tests (root: the vm tests need namespaces)"
	@echo "make test-unit  unit tests only (no root needed)"
	@echo "make test-vm    end-to-end tests only (root)"
	@echo "make lint       ruff + mypy"
	@echo "make demo       setup + build + a short end-to-end demonstration (root)"
	@echo "make clean      remove build products; distclean also removes $(VENV)"

setup: apt venv

# Installs only what is missing, so `make setup` is quick and harmless on a ready machine.
apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' \
			|| missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "missing Debian packages:$$missing; run as root: sudo make setup" >&2; exit 1; \
		fi; \
		echo "installing:$$missing"; \
		apt-get update; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# Reinstalled when the packaging files change; `build` recompiles the C stack every time.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=68' wheel
	$(PIP) install -q -e '.[test]'
	touch $@

build: venv
	$(PY) setup.py -q build_ext --inplace --force

test: setup build
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-unit: venv build
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

test-vm: setup build
	$(PY) -m pytest $(PYTEST_ARGS) tests/vm

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo: setup build
	$(PY) tools/demo.py

clean:
	rm -rf build csrc/build tunio/_stack.c tunio/*.so tunio/*.o csrc/*.o *.egg-info \
		.pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# ---- targets kept by the lead: sanitizers, fuzzing, benchmarks -------------------------------
# asan: build the stack with ASan/UBSan (TUNIO_SANITIZE=1) and run the tests against it.
asan:
	@echo "asan: not defined yet" >&2; exit 1

# fuzz: run every parser's fuzz target for a bounded time.
fuzz:
	@echo "fuzz: not defined yet" >&2; exit 1

# bench: throughput/connection-rate benchmarks in the lab; results under bench/results/.
bench:
	@echo "bench: not defined yet" >&2; exit 1
# ---- end of the lead's targets ---------------------------------------------------------------
