# Two entry points for a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Both build a virtual environment in .venv first (only what each needs: the edge with WFDB
# files and plotting for the demo; the test extra for the tests).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench bench-detector clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.edge: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.bench: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

demo: $(VENV)/.edge
	$(BIN)/ecg-edge demo

test: $(VENV)/.test
	$(BIN)/python -m pytest

bench: $(VENV)/.test
	$(BIN)/ecg-edge bench

bench-detector: $(VENV)/.bench
	$(BIN)/ecg-edge bench-detector

clean:
	rm -rf $(VENV) out
