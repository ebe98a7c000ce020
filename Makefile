# make demo: the main job on the embedded default (creates .venv if needed)
# make test: the whole test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON312 := $(shell command -v python3.12 2>/dev/null || ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export JAX_PLATFORMS ?= cpu

.PHONY: venv demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (python3.12 on PATH or pyenv 3.12.x)" >&2; exit 2; fi
	@[ -x $(PY) ] || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/svdq-jax demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) benchmarks/quant_error.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf $(VENV) build *.egg-info
