# Two commands: `make run` installs and runs the node on its embedded defaults;
# `make test` installs what the tests need and runs the whole suite (CI runs it too).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench peers models

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

# Retrain the shipped demo models from scratch on synthetic chest CT phantoms and record their held-out
# figures in the bundles: detection about 30 minutes (1 thread), segmentation anatomy about 25 minutes
# (1 thread), its nodule branch about 25-50 minutes (2 threads), its small-nodule stage about 12 minutes
# (2 threads), each evaluation about 5-10 minutes.
DATA ?= build/phantoms
models: $(BIN)/dicom-node
	$(BIN)/dicom-node phantom --out $(DATA)/train --cases 56 --seed 1000 --no-dicom
	$(BIN)/dicom-node phantom --out $(DATA)/heldout --cases 32 --seed 100000 --no-dicom
	$(BIN)/dicom-node train detection --dataset $(DATA)/train --out workers/bundles/lung_nodule_detection --seed 0 --threads 1
	$(BIN)/dicom-node evaluate --bundle workers/bundles/lung_nodule_detection --dataset $(DATA)/heldout --record --threads 1
	$(BIN)/dicom-node train segmentation --dataset $(DATA)/train --out build/chest_ct_anatomy --epochs 12 --val-fraction 0.15 --val-interval 3 --seed 0 --threads 1
	$(BIN)/dicom-node train nodule-branch --dataset $(DATA)/train --base-bundle build/chest_ct_anatomy --out build/chest_ct_nodule_branch --epochs 250 --val-fraction 0.15 --val-interval 10 --seed 0 --threads 2
	$(BIN)/dicom-node phantom --out $(DATA)/candidates --cases 100 --seed 2000 --no-dicom
	$(BIN)/dicom-node train small-nodules --dataset $(DATA)/candidates --base-bundle build/chest_ct_nodule_branch --out workers/bundles/chest_ct_segmentation --epochs 12 --seed 0 --threads 2
	$(BIN)/dicom-node evaluate --bundle workers/bundles/chest_ct_segmentation --dataset $(DATA)/heldout --record --threads 1
