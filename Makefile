# make demo: the main job on the embedded default (creates .venv with Python 3.12 if needed)
# make test: the whole test suite, as CI runs it (installs the test extras: torch, diffusers, ...)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON312 := $(shell command -v python3.12 2>/dev/null || ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Threaded OpenBLAS spends 30-40x the CPU time on the small SVDs and QRs of quantization on a busy
# machine (benchmarks/results/svd_algorithm_cpu.txt); the tests and the demo run it single-threaded.
export OPENBLAS_NUM_THREADS := 1
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: venv venv-test demo test test-fast lint bench clean

$(PY):
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (python3.12 on PATH or pyenv 3.12.x)" >&2; exit 2; fi
	$(PYTHON312) -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PIP) -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import svdq_jax, jax; assert jax.__version__ == '0.11.2', jax.__version__"
	@touch $@

# The test install also puts Mosaic GPU's compiler (the jax CUDA plugin, 142 MB of wheels) and
# nvdisasm in $(VENV)/mosaic-compile for tests/pallas_kernels/test_kernel_resources.py: not in
# site-packages, where plain `import jax` would find the plugin and try to start a CUDA backend.
# The plugin runs the first ptxas on PATH (this image: CUDA 13.0's); CUDA 13.0's ptxas goes into
# the same folder only where there is none.
# deepcompressor-toolkit is the reference packer of tests/convert/test_nunchaku*.py; it goes in
# with --no-deps (its packer needs only torch, safetensors, numpy and tqdm; its pinned dependencies
# would replace ours), so it is not in the test extra.
$(VENV)/.installed-test: pyproject.toml Makefile $(VENV)/.installed-base
	$(PIP) -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, diffusers, transformers, pytest"
	$(PIP) --no-deps deepcompressor-toolkit==0.1.0 2>&1 | { grep -v "is ignored: it is neither" || true; }
	rm -rf $(VENV)/mosaic-compile
	set -o pipefail; $(PIP) --no-deps --target $(VENV)/mosaic-compile \
	  jax-cuda13-pjrt==0.11.2 jax-cuda13-plugin==0.11.2 nvidia-cuda-nvdisasm==13.5.37 \
	  $$(command -v ptxas >/dev/null || echo nvidia-cuda-nvcc==13.0.88) \
	  2>&1 | { grep -v "is ignored: it is neither" || true; }
	@touch $@

venv: $(VENV)/.installed-base
venv-test: $(VENV)/.installed-test

# The XLA compilation cache makes a second `make demo` skip most of the first one's compiling.
demo: venv
	JAX_COMPILATION_CACHE_DIR=$(abspath $(VENV))/jax-cache $(VENV)/bin/svdq-jax demo

test: venv-test
	$(PY) -m ruff check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadfile --durations=30

test-fast: venv-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: venv-test
	$(PY) -m ruff check .

bench: venv
	$(PY) benchmarks/quant_error.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf $(VENV) build *.egg-info
