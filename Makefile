# `make repro` sets up .venv and runs the whole pipeline; `make test` sets up .venv (and the system packages the tests use) and runs the tests.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
NODEPS := $(shell sed -n 's/^nodeps_requirements *= *//p' settings.ini)
CONVERT := .venv-convert
CONVERT_REQS := $(shell sed -n 's/^convert_requirements *= *//p' settings.ini)
CONVERT_NODEPS := $(shell sed -n 's/^convert_nodeps_requirements *= *//p' settings.ini)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BIN)/llmops-tpl: settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(NODEPS)
	touch $@

# the exporter's own environment: it converts the fine-tuned model for the inference engine (paths.convert_env)
$(CONVERT)/bin/optimum-cli: settings.ini
	$(PYTHON) -m venv $(CONVERT)
	$(CONVERT)/bin/pip install --quiet --upgrade pip
	$(CONVERT)/bin/pip install --quiet $(CONVERT_REQS)
	$(CONVERT)/bin/pip install --quiet --no-deps $(CONVERT_NODEPS)
	touch $@

.PHONY: install system repro test test-scale lab app
install: $(BIN)/llmops-tpl $(CONVERT)/bin/optimum-cli

# Debian's Chromium and a font (the app's browser tests), PostgreSQL (the feedback store's server test) and a Java runtime
# (pyspark, for index.engine spark); elsewhere those tests are skipped
system:
	@missing=""; [ -x /usr/bin/chromium ] || missing="$$missing chromium fonts-liberation"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; then :; \
	else echo "could not install$$missing here: install it yourself, or its tests are skipped (in CI, CI=true, they fail)"; fi

repro: install
	$(BIN)/llmops-tpl repro

test: install system
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest

# the engines past one machine, each started for real on 127.0.0.1 (a pipeline of its own: about 6 minutes more)
test-scale: install system
	$(BIN)/pytest -m scale

lab: install
	$(BIN)/jupyter lab

app: install
	$(BIN)/llmops-tpl app
