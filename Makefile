# Two entry points: `make repro` and `make test`. Both use the same .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TEST_WORKERS ?= 2

.PHONY: repro test test-full venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

repro: venv
	$(PY) -m experiments.reproduce --quick --results_dir=results

# Tests set up their own 8-device CPU mesh in tests/conftest.py.
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist=loadfile

test-full: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist=loadfile -m "slow or not slow"

clean:
	rm -rf $(VENV) results
