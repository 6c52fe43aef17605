# Every target works on a fresh clone: the first one that needs Python creates .venv and
# installs the pinned stack into it (once; re-run only when the lock or pyproject changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH_PIN := $(shell grep -E '^torch==' requirements.lock)
CONFIG ?= configs/hippocampus_3d.yaml
ARGS ?=
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
MLFLOW_PORT ?= 5055

.PHONY: setup test lint bench lock train mlflow-ui

$(INSTALLED): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch alone first: installed after others it could arrive as a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(INSTALLED)

lint: $(INSTALLED)
	$(BIN)/ruff check segment tests benchmarks data_scripts

test: lint
	$(BIN)/pytest

train: $(INSTALLED)
	$(BIN)/segment train --config $(CONFIG) --tracking-uri $(TRACKING_URI) $(ARGS)

# One worker and no job runner: the defaults start several processes and about 3 GB.
mlflow-ui: $(INSTALLED)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

bench: $(INSTALLED)
	$(BIN)/python benchmarks/model_step.py

lock: $(INSTALLED)
	head -3 requirements.lock > requirements.lock.new
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' >> requirements.lock.new
	mv requirements.lock.new requirements.lock
