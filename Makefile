# nemo-lpo: one virtual environment (.venv, Python 3.12) and the commands that run in it.
# `make demo` and `make test` set everything up first; set-up is skipped when pyproject.toml and constraints.txt are unchanged.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help setup demo test test-fast lint bench reproduce clean

help:
	@echo "make demo       set up, then run the embedded default end to end (tiny Mixtral, CPU)"
	@echo "make test       set up, then run the whole test suite"
	@echo "make lint       ruff (pyflakes, docstrings, imports)"
	@echo "make bench      print the benchmarks' side-by-side ratios"
	@echo "make reproduce  the paper's findings in miniature (report under outputs/reproduce)"

# pyproject.toml holds ranges (containers keep their own builds); constraints.txt the exact tested set
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || "$$(scripts/find_python312.sh)" -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nemo-lpo demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not distributed and not slurm" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

reproduce: setup
	$(BIN)/nemo-lpo reproduce

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
