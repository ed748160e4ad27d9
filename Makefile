# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv chromium run ui bench papo-study test test-fast lint fmt clean

venv: $(STAMP)

# Plain venv + pip (uv/poetry would not see the local CPU torch wheel). The lock pins every version.
# The machine's pip config may name local indexes that do not exist; their warnings are filtered out.
PIP := $(PY) -m pip install -q --progress-bar off
QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip $(QUIET)
	$(PIP) -r requirements.lock $(QUIET)
	$(PIP) --no-deps --no-build-isolation -e . $(QUIET)
	touch $(STAMP)

# The browser test (tests/test_ui_browser.py) drives Debian's chromium and chromedriver. Installed with
# apt-get when missing (CI runs as root on Debian; elsewhere through sudo); nothing to do once present.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

run: $(STAMP)
	$(PY) -m npr_pipelines.cli run

# Dagster UI on http://127.0.0.1:3000 and MLflow UI on http://127.0.0.1:5000, over the same .npr state.
ui: $(STAMP)
	$(PY) -m npr_pipelines.cli ui

# Engine figures on the toy model (parallel vs sequential replay, vs transformers.generate, KV memory):
# .npr/bench/engine.json; parallel-SFT attention step time and peak memory: .npr/bench/training.json.
bench: $(STAMP)
	$(PY) -m npr_pipelines.bench
	$(PY) -m npr_pipelines.training.bench_attention --out .npr/bench/training.json

# After `make run`: PAPO for 128 steps from its NPR-Beta against a matched SFT control (~40 min on 2 cores):
# .npr/reports/papo_study.json.
papo-study: $(STAMP)
	rm -rf .npr/work/papo_study
	$(PY) -m npr_pipelines.training.papo_study

# Two pytest-xdist workers: run alone, the suite leaves a core idle whenever it waits on subprocesses, Ray
# or the browser, or runs on one thread. tests/conftest.py groups the work units (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test-fast: $(STAMP) chromium
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
