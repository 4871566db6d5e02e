.PHONY: deps deps-latest check test test-latest test-core lint demo bench deb rpm

VENV := .venv/bin
LATEST := .venv-latest/bin

deps:
	scripts/install-deps

# .venv-latest: the newest PyPI releases of the runtime dependencies (scripts/install-deps).
deps-latest: deps
	scripts/install-deps --latest

lint: deps
	$(VENV)/ruff check prep_agent tests benchmarks
	$(VENV)/ruff format --check prep_agent tests benchmarks
	$(VENV)/mypy prep_agent benchmarks

# --durations: the slowest tests in CI's log, to keep the suite's time in view.
test: deps
	$(VENV)/python -m pytest --durations=30

# The second leg: the suite on the newest PyPI releases, except the packaging, edge
# and drill tests (the .deb and .rpm are built on Debian's packages, the edge drills
# test Debian's haproxy/varnish/nginx configuration, and the loopback rehearsals
# run minutes of processes whose code the rest of the suite covers; the first leg
# runs them). The rule for packaging and edge: a test is marked so only if its
# result cannot depend on the venv's library versions, i.e. none of our code under
# test runs on them (Debian's tools build the packages, Debian's python3 runs the
# installed agent: tests/test_fresh_system.py, tests/test_package_split.py).
test-latest: deps-latest
	$(LATEST)/python -m pytest --durations=30 -m "not packaging and not edge and not drill"

# Only the tests marked core: they need Python and the runtime dependencies, no
# system tools, so no deps (any venv will do: make test-core PYTHON=venv/bin/python).
# PATH holds only the venv's bin folder, so a core test that runs a system tool fails.
PYTHON ?= $(VENV)/python
test-core:
	/usr/bin/env PATH="$(abspath $(dir $(PYTHON)))" $(abspath $(PYTHON)) -m pytest -m core

# The README's test command: everything CI runs, on Debian's packages and on the newest releases.
check: lint test test-latest

# The README's run command: agent + simulated institute on localhost.
demo: deps
	$(VENV)/prep-agent demo

bench: deps
	$(VENV)/python -m benchmarks.publish --loop-ext4 4
	$(VENV)/python -m benchmarks.serve
	$(VENV)/python -m benchmarks.report

# Packages into dist/ (Debian 12 .deb; EL9 .rpm and .src.rpm): packaging/README.md.
deb:
	packaging/build-deb

rpm:
	packaging/build-rpm
