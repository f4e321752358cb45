# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   -> a virtual environment, the package, and the demo job (jobs/demo.yaml)
#   make test   -> the same environment plus test tools, and the whole test suite
# Both install at the versions of requirements.lock (the environment the tests pass in, also the
# image's); `make lock` writes it again from .venv after a change of constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Quantus, a test-only peer, installed without its dependencies: it asks for the GUI build of
# OpenCV, which clashes with grad-cam's headless one; everything it imports is installed anyway
QUANTUS := quantus==0.6.0

.PHONY: demo test lint mutation lock
$(BIN)/.installed: pyproject.toml constraints.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -c requirements.lock -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(QUANTUS)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/salient run jobs/demo.yaml

test: $(BIN)/.installed
	$(BIN)/ruff check pipeline tests
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(BIN)/.installed
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

# Mutation testing of the core modules (tests/mutation/run.py; ~30 min on 2 cores, not in CI).
# MUTATION_ARGS="--per-module 0" runs every mutant; "--module pipeline/metrics/localisation.py"
# one module.
mutation: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -c requirements.lock -e '.[test,mutation]'
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tests/mutation/run.py $(MUTATION_ARGS)

# requirements.lock again, after a change of constraints.txt or pyproject's dependencies: .venv
# installed with constraints.txt alone, then frozen (the lock's header comment kept). Then `make
# test`: the lock is what it passes with.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	touch $(BIN)/.installed
