# segs-stream — the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lint test test-unit demo bench clean

# PYTHONWARNINGS: setuptools warns on every editable build with a C extension that folders
# named like the package may shadow it; in this flat layout that folder is the package.
INSTALL := PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install -q -e

$(STAMP): pyproject.toml setup.py segs/intake/_fastscan.c segs/intake/_names.c segs/intake/_names.h
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(INSTALL) ".[dev]"
	@touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## test: lint, type-check, then every test tier against a real local Kafka and PostgreSQL
test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

## test-unit: only the tests that need no servers
test-unit: $(STAMP)
	$(BIN)/pytest -m "not integration and not fault" $(PYTEST_ARGS)

## demo: local Kafka + PostgreSQL, simulator, the service, a summary; stops everything on exit
demo: $(STAMP)
	$(BIN)/segs-stream demo

## bench: the benchmark suite (pass BENCH_ARGS=--quick for a smoke run)
bench: $(STAMP)
	@$(INSTALL) ".[dev,bench]"
	$(BIN)/segs-stream bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build segs/intake/_fastscan.*.so
