# nns_cuda — the two Quickstart commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PAIR := torch==2.9.1 torchvision==0.24.1
else
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
endif
# Compile the CUDA sources too when nvcc exists and torch is a CUDA build (README, "Backends
# and building for CUDA"):
# on a CPU-only machine this only proves the .cu files compile; the CPU kernels run.
NVCC := $(shell command -v nvcc 2>/dev/null)
BUILD_ENV := MAX_JOBS=$${MAX_JOBS:-2}
ifneq ($(NVCC),)
BUILD_ENV += FORCE_CUDA=$${FORCE_CUDA:-1} CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}"
endif
PYTEST_ARGS ?=

.PHONY: venv deps build test test-slow demo bench clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PAIR)
	$(PIP) install -q -r requirements.txt
	touch $@

deps: $(VENV)/.deps

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/include/nns_cuda/*.h csrc/include/nns_cuda/ops/*.h)
	if [ -n "$(NVCC)" ] && ! $(PY) -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)'; then \
	  echo "torch is a CPU build: building the C++ extension only"; \
	  MAX_JOBS=$${MAX_JOBS:-2} NNS_NO_CUDA=1 $(PIP) install -q --no-build-isolation --no-deps -e . ; \
	else \
	  $(BUILD_ENV) $(PIP) install -q --no-build-isolation --no-deps -e . ; \
	fi
	$(PY) -c 'import nns_cuda; i = nns_cuda.ext_info(); assert i["loaded"], i["error"]; print("nns_cuda._C loaded:", i)'
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: build
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: build
	$(PY) -m nns_cuda demo --out nns_output/demo

bench: build
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf build *.egg-info nns_cuda/*.so $(VENV)/.built
