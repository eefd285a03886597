# `make run` trains on the embedded default data; `make test` runs lint and the whole suite;
# `make test-fast` runs lint and the tests not marked slow or integration (the inner loop).
# Both create .venv and install the project first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: venv run test test-fast lint repro monitor clean-artifacts

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/normalcy train

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow and not integration"

repro: venv
	$(BIN)/python -m dvc repro

clean-artifacts:
	rm -rf artifacts data/prepared mlflow.db mlartifacts .dvc-remote
