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
DATA_ROOT := $(or $(SEGMENT_DATA_ROOT),data)
# The skip study's own store, so that its runs stay apart from everyday trainings.
STUDY_STORE ?= sqlite:///$(CURDIR)/study/mlflow.db
STUDY_ARGS ?=

.PHONY: setup test test-fast faults lint browser bench lock train mlflow-ui study study-progress study-stop app docs

$(INSTALLED): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch alone first: installed after others it could arrive as a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(INSTALLED)

lint: $(INSTALLED)
	$(BIN)/ruff check segment app tests benchmarks data_scripts docs

# The browser test drives Debian's Chromium; install it where apt-get may run (CI runs as root).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "Chromium not installed: the browser test will skip."

test: lint browser
	$(BIN)/pytest

# The tests that neither train nor start the segment command or a server: under a minute.
test-fast: $(INSTALLED)
	$(BIN)/pytest -m "not slow" -q

# The heavy fault drills (docs/reliability.md): eight browser sessions against one viewer, a
# torchrun rank that hangs, a group torchrun restarts, a tracking server stopped mid-run, a
# full disk while the best model is saved.
faults: lint browser
	$(BIN)/pytest -m faults

train: $(INSTALLED)
	$(BIN)/segment train --config $(CONFIG) --tracking-uri $(TRACKING_URI) $(ARGS)

APP_PORT ?= 8501
app: $(INSTALLED)
	$(BIN)/segment app --port $(APP_PORT) --tracking-uri $(TRACKING_URI)

# One worker and no job runner: the defaults start several processes and about 3 GB.
# MLflow's UI opens in its GenAI view until told otherwise; this link opens the model-training one.
mlflow-ui: $(INSTALLED)
	@echo "Runs: http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# The skip study (docs/study.md): every setting trained with skip dropout and without skips,
# three seeds each, each model analysed for fine detail, then the report with its figures. It
# runs in the background and resumes where it stopped; `make study-stop` stops it cleanly.
study: $(INSTALLED)
	test -d data/Task90_ISBI2012 || $(BIN)/python data_scripts/isbi2012_to_nifti.py \
		--source $(DATA_ROOT)/ISBI2012_EM_membrane --output data/Task90_ISBI2012
	mkdir -p study
	setsid nohup $(BIN)/segment study --data-root $(DATA_ROOT) --data-root data --tracking-uri $(STUDY_STORE) \
		--report docs/study/report.md $(STUDY_ARGS) >> study/study.log 2>&1 < /dev/null & echo $$! > study/study.pid
	@echo "The study runs in the background: tail -f study/study.log, or make study-progress."

study-progress: $(INSTALLED)
	$(BIN)/segment study --progress --tracking-uri $(STUDY_STORE) $(STUDY_ARGS)

# Running trainings save their last epoch first; `make study` resumes them.
study-stop:
	kill -TERM $$(cat study/study.pid)

# The generated halves of docs/cli.md and docs/configs.md, from the CLI and segment/config/sections.py.
docs: $(INSTALLED)
	$(BIN)/python docs/generate.py

# One table, and benchmarks/results.json (commit it after a real run on an idle machine).
bench: $(INSTALLED)
	$(BIN)/python benchmarks/run.py --data-root $(DATA_ROOT)

lock: $(INSTALLED)
	head -3 requirements.lock > requirements.lock.new
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' >> requirements.lock.new
	mv requirements.lock.new requirements.lock
