# Every target works on a fresh clone: the first one that needs Python creates .venv and
# installs the pinned stack into it (once; re-run only when the lock or pyproject changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH_PIN := $(shell grep -E '^torch==' requirements.lock)

.PHONY: setup test lint bench lock

$(INSTALLED): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch alone first: installed after others it could arrive as a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(INSTALLED)

lint: $(INSTALLED)
	$(BIN)/ruff check segment app tests benchmarks data_scripts

test: lint
	$(BIN)/pytest

bench: $(INSTALLED)
	$(BIN)/python benchmarks/model_step.py

lock: $(INSTALLED)
	head -3 requirements.lock > requirements.lock.new
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' >> requirements.lock.new
	mv requirements.lock.new requirements.lock
