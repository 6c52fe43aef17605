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
STUDY_EPOCHS ?= 30
# The default 3D model's long skips with one level off at a time, finest first.
LEVEL_OFF_SKIPS := 0111 1011 1101 1110

.PHONY: setup test test-fast lint browser bench lock train mlflow-ui study app docs

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

# The skip study: every study config trained for the same number of epochs, scored on its
# validation split (with the skip ablation where skips can be switched), then the report.
study: $(INSTALLED)
	set -e; for config in hippocampus_3d hippocampus_3d_noskip hippocampus_3d_resnet hippocampus_2d; do \
		$(BIN)/segment train --config configs/$$config.yaml --data-root $(DATA_ROOT) --tracking-uri $(TRACKING_URI) \
			--quiet --set trainer.max_epochs=$(STUDY_EPOCHS); \
	done
	# The references for switching skips off at inference: the same network with every skip and
	# no skip dropout, and one model per long skip trained without it.
	$(BIN)/segment train --config configs/hippocampus_3d.yaml --data-root $(DATA_ROOT) --tracking-uri $(TRACKING_URI) \
		--quiet --set trainer.max_epochs=$(STUDY_EPOCHS) name=hippocampus_3d_no_skip_dropout model.skip_dropout=0
	set -e; for skips in $(LEVEL_OFF_SKIPS); do \
		$(BIN)/segment train --config configs/hippocampus_3d.yaml --data-root $(DATA_ROOT) --tracking-uri $(TRACKING_URI) \
			--quiet --set trainer.max_epochs=$(STUDY_EPOCHS) name=hippocampus_3d_skips$$skips model.skip_dropout=0 \
			"model.long_skips=[$$(echo $$skips | sed 's/./&,/g; s/,$$//')]"; \
	done
	test -d data/Task90_ISBI2012 || $(BIN)/python data_scripts/isbi2012_to_nifti.py \
		--source $(DATA_ROOT)/ISBI2012_EM_membrane --output data/Task90_ISBI2012
	$(BIN)/segment train --config configs/isbi2012_2d.yaml --data-root data --tracking-uri $(TRACKING_URI) \
		--quiet --set trainer.max_epochs=$(STUDY_EPOCHS)
	$(BIN)/segment train --config configs/isbi2012_2d.yaml --data-root data --tracking-uri $(TRACKING_URI) \
		--quiet --set trainer.max_epochs=$(STUDY_EPOCHS) --set name=isbi2012_2d_no_skip_dropout --set model.skip_dropout=0
	set -e; for model in hippocampus_3d hippocampus_3d_resnet hippocampus_2d; do \
		$(BIN)/segment evaluate --model models:/$$model/latest --data $(DATA_ROOT)/Task04_Hippocampus \
			--split val --ablate-skips --tracking-uri $(TRACKING_URI); \
	done
	set -e; for model in hippocampus_3d_no_skip_dropout hippocampus_3d_noskip $(addprefix hippocampus_3d_skips,$(LEVEL_OFF_SKIPS)); do \
		$(BIN)/segment evaluate --model models:/$$model/latest --data $(DATA_ROOT)/Task04_Hippocampus \
			--split val --tracking-uri $(TRACKING_URI); \
	done
	set -e; for model in isbi2012_2d isbi2012_2d_no_skip_dropout; do \
		$(BIN)/segment evaluate --model models:/$$model/latest --data data/Task90_ISBI2012 \
			--split val --ablate-skips --tracking-uri $(TRACKING_URI); \
	done
	$(BIN)/segment report --tracking-uri $(TRACKING_URI) --output benchmarks/study.md

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
