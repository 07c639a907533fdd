# One command to set up and run each thing; a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sweep test quick lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The headline sweep: small and medium, three strategies, measured on this machine.
sweep: $(STAMP)
	$(PY) -m memexp -m model=small,medium strategy=none,sqrt,adaptive

test: $(STAMP)
	$(PY) -m ruff check memexp tests scripts
	$(PY) -m pytest

# The quick loop: everything but the tests marked slow (subprocess, launcher, W&B, the in-process
# sweep, measured and fake-device jobs, figure drawing, any test of a second or more): 524 of 809
# tests in about 81 CPU-seconds (84 s on two shared cores at load 2.8, `pytest -m "not slow"`),
# against about 19 CPU-minutes (23 minutes) for `make test`.
quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check memexp tests scripts
	$(PY) -m ruff format --check memexp tests scripts

clean:
	rm -rf $(VENV) outputs build dist
