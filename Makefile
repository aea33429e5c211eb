# The two commands of the README: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-zoo docs lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python -m nnslim demo

# The whole suite: unit tests and doctests, then the model-zoo group.
test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not zoo" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -m zoo tests $(PYTEST_ARGS)

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not zoo" $(PYTEST_ARGS)

test-zoo: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m zoo tests $(PYTEST_ARGS)

docs: $(VENV)/.dev-installed
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(VENV)/.dev-installed
	$(BIN)/python -m ruff check nnslim tests benchmarks

clean:
	rm -rf docs/_build build dist *.egg-info .pytest_cache .hypothesis
