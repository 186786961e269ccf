# Every target bootstraps its own virtual environment on a fresh machine (Python 3.11+ and venv needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-once test lint bench check clean llamacpp llamacpp-test

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
	$(BIN)/ruff check scer_proxy tests bench scripts
	$(BIN)/ruff format --check scer_proxy tests bench scripts
	$(BIN)/mypy scer_proxy
	$(BIN)/python scripts/import_graph.py > /dev/null

## llama.cpp's llama-server and a tiny generated model, for the integration tests (about 8 min, once).
llamacpp: $(STAMP)
	$(BIN)/python scripts/llamacpp_setup.py

## The proxy's client tests against a real llama-server (builds it first when needed).
llamacpp-test: llamacpp
	$(BIN)/python -m pytest -q -m llamacpp

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
