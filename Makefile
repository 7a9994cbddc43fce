# Two commands do everything: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build on this project's machines; pyproject's torch range admits it (see there).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast ui clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "from cvops_dagster.core.instance import ensure_dagster_home; ensure_dagster_home()"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cvops demo

test: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

ui: install
	$(VENV)/bin/cvops ui

# Removes what this project made (artifacts, the Dagster instance). Never the landing zone:
# that is the user's input (`rm -rf landing` by hand to start over from `cvops seed`).
clean:
	rm -rf .cvops .dagster_home
