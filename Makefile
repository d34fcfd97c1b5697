# nemo-lpo: one virtual environment (.venv, Python 3.12) and the commands that run in it.
# `make demo` and `make test` set everything up first; set-up is skipped when pyproject.toml and constraints.txt are unchanged.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help setup bridge-env demo test test-fast lint bench reproduce clean

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

# The Megatron-Bridge test environment (.venv-bridge): megatron-bridge 0.6.2 with the transformers 5.12.1 /
# tokenizers / huggingface-hub it requires, beside the main venv whose transformers is newer. It installs only
# what constraints-bridge.txt pins, with --no-deps: Bridge declares GPU-only or unbuildable packages (flashinfer,
# fast-hadamard-transform, transformer-engine) and nvidia-resiliency-ext, whose PyPI release breaks
# `import megatron.core.dist_checkpointing`; the pinned set is what its training path imports. Everything else
# (torch, megatron-core, numpy, ...) comes from the main venv through a .pth line written AFTER the install, so
# pip never sees (nor touches) the main venv, torch is not installed twice (~3 GB), and the bridge venv's own
# packages come first on sys.path (a .pth path is appended after its site-packages).
BRIDGE_VENV := .venv-bridge
BRIDGE_STAMP := $(BRIDGE_VENV)/.installed
$(BRIDGE_STAMP): $(STAMP) constraints-bridge.txt
	rm -rf $(BRIDGE_VENV)
	$(BIN)/python -m venv --without-pip $(BRIDGE_VENV)
	$(BIN)/python -m pip --python $(BRIDGE_VENV)/bin/python install --quiet --disable-pip-version-check \
		--no-deps -r constraints-bridge.txt
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(BRIDGE_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_main_venv.pth"
	PYTHONPATH=$(CURDIR) $(BRIDGE_VENV)/bin/python -m tests.bridge_env_check
	@touch $(BRIDGE_STAMP)

bridge-env: $(BRIDGE_STAMP)

setup: $(STAMP) $(BRIDGE_STAMP)

demo: setup
	$(BIN)/nemo-lpo demo

# Two pytest runs: the `bridge` tests in .venv-bridge (its transformers 5.12.1 must be the one imported, and
# Megatron-Bridge's import costs a minute, paid once there), everything else in .venv. In .venv-bridge they fail,
# never skip, when Megatron-Bridge does not import. BRIDGE_TESTS: the files holding `bridge` tests (collecting
# the whole suite there would import every other test module under transformers 5.12.1 for nothing); the .venv run
# does not collect them (some import Megatron-Bridge at their top).
BRIDGE_TESTS := tests/test_bridge_cpu_compat.py tests/test_bridge_recipes.py tests/test_bridge_loop.py tests/test_bridge_peft.py
NOT_BRIDGE := -m "not bridge" $(addprefix --ignore=,$(BRIDGE_TESTS))
BRIDGE_PYTEST := PYTHONPATH=$(CURDIR) $(BRIDGE_VENV)/bin/python -m pytest -m bridge $(BRIDGE_TESTS)

test: setup
	$(BIN)/python -m pytest $(NOT_BRIDGE) $(PYTEST_ARGS)
	$(BRIDGE_PYTEST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not distributed and not slurm and not bridge" $(addprefix --ignore=,$(BRIDGE_TESTS)) $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

reproduce: setup
	$(BIN)/nemo-lpo reproduce

clean:
	rm -rf $(VENV) $(BRIDGE_VENV) build *.egg-info .pytest_cache .ruff_cache
