# Two set-up commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Every version, direct and transitive, that CI tested: a pip constraints file made by `make lock`.
LOCK := requirements.lock

# Which built-in world (or pack file) runs: WORLD=cards runs the card world, in its own state
# folder (.state-cards), so each world keeps its own tables, runs, registry and Bentos.
ifneq ($(WORLD),)
export EVENTML_PACK := $(WORLD)
ifneq ($(WORLD),lending)
EVENTML_HOME ?= $(CURDIR)/.state-$(notdir $(basename $(WORLD)))
endif
endif
# All runtime state lives under one folder.
EVENTML_HOME ?= $(CURDIR)/.state
# Dagster refuses a relative DAGSTER_HOME: a relative EVENTML_HOME is resolved against this folder.
export EVENTML_HOME := $(abspath $(EVENTML_HOME))
export DAGSTER_HOME ?= $(EVENTML_HOME)/dagster
LOGS := $(EVENTML_HOME)/logs

.PHONY: install setup services services-stop lock demo advance migrate test ui mlflow serve stream stream-produce bench fuzz lint clean clean-all

# Quiet on success; on failure the log's tail and its path.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@mkdir -p $(LOGS)
	@echo "installing eventml into $(VENV) from $(LOCK) (log: $(LOGS)/install.log)"
	@# torch==2.13.0 (pyproject and lock): pip takes the CPU build on disk, not a CUDA download.
	@{ $(PYTHON) -m venv $(VENV) \
	  && $(BIN)/pip install --upgrade -c $(LOCK) pip \
	  && $(BIN)/pip install -c $(LOCK) -e '.[dev]' \
	  && $(BIN)/pip check; } > $(LOGS)/install.log 2>&1 \
	  || { tail -n 15 $(LOGS)/install.log; echo "install failed: see $(LOGS)/install.log"; exit 1; }
	@touch $@

install: $(VENV)/.installed

# Re-resolve every dependency from pyproject.toml in a scratch environment and write the lock:
# a deliberate act, committed with the change that needed it. torch's local tag (+cpu) is
# dropped so the same line takes the CPU build on disk here and the PyPI release elsewhere.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	.lock-venv/bin/pip check
	{ echo "# Made by \`make lock\` from pyproject.toml: every version CI tests. Installed as pip constraints."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//' | grep -v '^eventml'; } > $(LOCK)
	rm -rf .lock-venv

# Every store created once (folders, dagster.yaml, Dagster and MLflow storage), before any two
# processes can race to create it. Every entry point runs it first: `ui` and `mlflow` here, the
# demo, the time machine and `serve` in their own main().
setup: install
	@$(PY) -m resources.state

# The production counterparts, for real: a throwaway Postgres and Redis under $(EVENTML_HOME)/services.
# Then EVENTML_POSTGRES_URL=$$(scripts/services.sh url) puts Dagster and MLflow on Postgres, and
# EVENTML_REDIS_URL=$$(scripts/services.sh redis-url) the online store on Redis.
services:
	@scripts/services.sh start

services-stop:
	@scripts/services.sh stop

demo: install
	@$(PY) -m ml_assets.demo

# The time machine: DAYS more days of the world arrive, are served and judged; the sensors'
# retrains run (make ui shows it all). STEP days per run.
advance: install
	$(PY) -m ml_assets.time_machine --days $(or $(DAYS),7) --step $(or $(STEP),5)

# After a change to the dataset pack: evolve the source tables, rebuild the derived ones
# (docs/dataset-packs.md, "Changing a pack"). ARGS=--dry-run says what would change.
migrate: install
	$(PY) -m ml_assets.migrate $(ARGS)

# Postgres and Redis are started for their tests; where one cannot start its tests skip, saying
# why (CI fails).
test: install
	@scripts/services.sh start || echo "a service did not start: its tests skip (under CI they fail)"
	EVENTML_TEST_POSTGRES_URL=$$(scripts/services.sh url) EVENTML_TEST_REDIS_URL=$$(scripts/services.sh redis-url) \
	  $(PY) -m pytest -q -n 2 --no-loadscope-reorder --durations=25

# The code location is named after the pack (written by `make setup`); UI_PORT=3001 runs a
# second world's UI beside the first.
ui: setup
	$(BIN)/dagster dev -w $(DAGSTER_HOME)/workspace.yaml -p $(or $(UI_PORT),3000)

mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri $$($(PY) -c "from eventml.home import StateHome; from resources.state import mlflow_tracking; print(mlflow_tracking(StateHome.from_env()).tracking_uri)") --port 5000

# Real time (after `make services`): the stream consumer, until stopped, reading the world's
# stream into the online store (on Redis) and landing it in Delta. Publish days into the stream
# beside it: `make stream-produce DAYS=0:7` (docs/streaming.md).
REDIS_ENV = EVENTML_REDIS_URL=$${EVENTML_REDIS_URL:-$$(scripts/services.sh redis-url)}
stream: setup
	$(REDIS_ENV) $(PY) -m eventml.stream consume

stream-produce: install
	$(REDIS_ENV) $(PY) -m eventml.stream produce --days $(or $(DAYS),0:7)

# The MLflow champion's Bento (built by `risk_service_bento`), on http://127.0.0.1:3000 (PORT=… to change).
serve: install
	$(PY) -m ml_assets.serve --port $(or $(PORT),3000)

bench: install
	$(PY) bench/simulate.py
	$(PY) bench/features.py
	$(PY) bench/encoder.py

# The full fuzzing counts (make test runs fewer): 1,000 landing-zone files, 5,000 generated
# requests per scoring operation against a served Bento (docs/reliability.md).
fuzz: install
	EVENTML_FUZZ_EXAMPLES=1000 $(PY) -m pytest -q tests/eventml/test_landing.py
	EVENTML_FUZZ_EXAMPLES_HTTP=5000 $(PY) -m pytest -q -s tests/e2e/test_bento.py -k "fuzz or no_input"

lint: install
	$(BIN)/ruff check eventml ml_assets resources tests bench

# Everything the system wrote, but not the landing zone: the files users brought are theirs.
clean:
	-scripts/services.sh stop
	-find $(EVENTML_HOME) -mindepth 1 -maxdepth 1 ! -name landing -exec rm -rf {} +

clean-all: clean
	rm -rf $(EVENTML_HOME)
