# netswap: `make demo` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-long lint bench compiled test-compiled clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "netswap needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot,dev,dask]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/netswap demo --jobs 2

test: $(STAMP)
	$(PY) -m pytest -q

# The long fuzz and load runs (minutes, not seconds).
test-long: $(STAMP)
	NETSWAP_LONG=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

bench: $(STAMP)
	$(PY) bench/server_vs_nbdkit.py
	$(PY) bench/swapout.py

# The model compiled with mypyc, for sweeps and long runs (bench/compile_model.py): the same
# outcomes in about two thirds of the CPU.  Use it with PYTHONPATH=.build/compiled.
# Needs a C compiler and Python's headers (Debian: gcc, python3-dev).
compiled: $(STAMP)
	$(PY) bench/compile_model.py

# The suite against the compiled model: what passes in Python passes compiled, but for the
# tests marked patches_model, which it skips (and tests/test_compiled.py, which builds its own).
test-compiled: compiled
	PYTHONPATH=.build/compiled $(VENV)/bin/pytest -q --import-mode=append --ignore=tests/test_compiled.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build .build *.egg-info
