# Two commands on a fresh machine: `make run` and `make test`. `make help` lists the rest.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# No telemetry. (Ray's authentication is the launcher's own decision: launcher/cluster.py.)
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

.DEFAULT_GOAL := help
.PHONY: help setup run test test-full lint plan bench bench-gpu mlflow-ui docker clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install (fast when nothing changed)

# torch + torchvision first, as a pair, so no other package's range pulls another torch build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,deepspeed,bench]'
	touch $(STAMP)

run: setup ## train BERT smoke on 2 CPU workers (embedded Ray, MLflow in ./mlflow.db)
	$(BIN)/python -m launcher scale=smoke

test: setup ## lint, type-check and run the tests (unit + integration; 2 processes, then the serial ones)
	$(BIN)/ruff check launcher recipes tests bench
	@# mypy beside the tests (a minute from a fresh clone). Test files in collection order (the integration
	@# files, the long ones, first; the many short unit files fill in at the end), not xdist's default
	@# of files with the most tests first, which left a one-test file of minutes for the end
	$(BIN)/mypy > $(VENV)/mypy.out 2>&1 & typing=$$!; \
	$(BIN)/python -m pytest -q --durations=25 -n 2 --dist loadfile --no-loadscope-reorder -m 'not gpu and not serial and not full' tests; \
	tests=$$?; wait $$typing; typed=$$?; cat $(VENV)/mypy.out; rm -f $(VENV)/mypy.out; [ $$tests = 0 ] && [ $$typed = 0 ]
	$(BIN)/python -m pytest -q -m serial tests

test-full: setup ## the full-scale tier: each recipe at scale=full, 2 steps on generated full-size data (5-6 min on 2 cores) -> bench/results/full_scale.json, BENCHMARKS.md
	$(BIN)/python -m pytest -q --durations=10 -m full tests/integration/test_full_scale.py
	$(BIN)/python bench/tables.py

plan: setup ## show the plan for BERT on 8x8 80 GB GPUs at global batch 8192 (no training)
	$(BIN)/python -m launcher action=plan cluster.nodes=8 cluster.gpus_per_node=8 cluster.gpu_memory_gb=80 batch.global_batch=8192

bench: setup ## benchmarks on CPU -> bench/results/*.json, then BENCHMARKS.md's tables (about 10 min on 2 cores)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/tables.py

bench-gpu: setup ## on a GPU: ResNet-50, BERT-large MFU, Mask R-CNN, memory -> bench/results/gpu.json
	$(BIN)/python bench/gpu.py

mlflow-ui: setup ## open the local MLflow store at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

docker: ## build the image (needs a Docker engine)
	docker build -t launcher:latest .

clean: ## remove outputs, local MLflow store and caches (keeps .venv)
	rm -rf outputs mlflow.db mlruns .pytest_cache .mypy_cache .ruff_cache bench/results/*.tmp
