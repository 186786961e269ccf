# Every target bootstraps its own virtual environment on a fresh machine (Python 3.11+ and venv needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-once test lint bench check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## The proxy in front of the built-in simulator, a short workload, the summary; Ctrl-C to stop.
demo: $(STAMP)
	$(BIN)/scer-proxy demo

demo-once: $(STAMP)
	$(BIN)/scer-proxy demo --once

## The test suite (real servers on loopback, no network, no GPU).
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check scer_proxy tests bench
	$(BIN)/mypy scer_proxy

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
