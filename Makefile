# Two commands: `make run` installs and runs the node on its embedded defaults;
# `make test` installs what the tests need and runs the whole suite (CI runs it too).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench peers

$(BIN)/dicom-node: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/dicom-node
	$(BIN)/dicom-node serve $(ARGS)

peers:
	tests/install-peers.sh

test: peers $(BIN)/dicom-node
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: peers $(BIN)/dicom-node
	$(BIN)/python bench/ingest.py
