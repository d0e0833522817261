# Two set-up commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

# All runtime state lives under one folder.
EVENTML_HOME ?= $(CURDIR)/.state
# Dagster refuses a relative DAGSTER_HOME: a relative EVENTML_HOME is resolved against this folder.
export EVENTML_HOME := $(abspath $(EVENTML_HOME))
export DAGSTER_HOME ?= $(EVENTML_HOME)/dagster

.PHONY: install demo advance test ui mlflow serve bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject: pip takes the CPU build on disk, not a CUDA download.
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip check
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\n' > $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m ml_assets.demo

# The time machine: DAYS more days of the world arrive, are served and judged; the sensors'
# retrains run (make ui shows it all). STEP days per run.
advance: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m ml_assets.time_machine --days $(or $(DAYS),7) --step $(or $(STEP),5)

test: install
	$(PY) -m pytest -q

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml

mlflow: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(EVENTML_HOME)/mlflow/mlflow.db --port 5000

# The MLflow champion's Bento (built by `risk_service_bento`), on http://127.0.0.1:3000 (PORT=… to change).
serve: install
	$(PY) -m ml_assets.serve --port $(or $(PORT),3000)

bench: install
	$(PY) bench/simulate.py
	$(PY) bench/features.py
	$(PY) bench/encoder.py

lint: install
	$(BIN)/ruff check eventml ml_assets resources tests bench

clean:
	rm -rf $(EVENTML_HOME)
