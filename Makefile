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

.PHONY: install system-deps demo test test-fast ui clean

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

# System packages some tests use, installed when missing and possible (root, or passwordless
# sudo); otherwise those tests skip and say why:
# - chromium: the browser tests (the Dagster UI tour, the FiftyOne App) drive Debian's Chromium
#   with Playwright (Playwright's own browser download needs the network);
# - postgresql: the scale-out tests start a real PostgreSQL server (initdb + pg_ctl);
# - redis-server: the scale-out lifecycle test starts Redis, the Celery workers' broker.
SYSTEM_PACKAGES := $(if $(wildcard /usr/bin/chromium),,chromium) $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql) \
	$(if $(wildcard /usr/bin/redis-server),,redis-server)

system-deps:
	@pkgs="$(strip $(SYSTEM_PACKAGES))"; \
	if [ -n "$$pkgs" ] && command -v apt-get >/dev/null 2>&1; then \
		sudo=""; \
		if [ "$$(id -u)" -ne 0 ]; then \
			if sudo -n true 2>/dev/null; then sudo="sudo -n"; else echo "note: $$pkgs missing and no root: the tests needing them will skip"; exit 0; fi; \
		fi; \
		echo "installing $$pkgs for the tests (apt-get)"; \
		{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs; } >/tmp/cvops-system-deps.log 2>&1 \
			|| echo "warning: could not install $$pkgs (see /tmp/cvops-system-deps.log): the tests needing them will skip"; \
	fi

test: install system-deps
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

ui: install
	$(VENV)/bin/cvops ui

# Removes what this project made (artifacts, the Dagster instance). Never the landing zone:
# that is the user's input (`rm -rf landing` by hand to start over from `cvops seed`).
clean:
	rm -rf .cvops .dagster_home
