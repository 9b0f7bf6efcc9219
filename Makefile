# Two commands: `make run` installs and runs the node on its embedded defaults;
# `make test` installs what the tests need and runs the whole suite (CI runs it too).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench peers models

# nnU-Net v2 (docs/nnunet.md): serving needs only dynamic-network-architectures' U-Net classes, the tests
# compare with nnunetv2's own predictor. Both are installed without their declared dependencies, which lead
# to timm and torchvision (torchvision does not import beside the pinned torch); what their code imports is
# listed here instead.
NNUNET_SERVING := dynamic-network-architectures==0.4.4
NNUNET_TESTS := nnunetv2==2.8.1 acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
	SimpleITK==2.5.7 scikit-image==0.26.0 imageio==2.38.2 tifffile==2026.3.3 lazy_loader==0.6 \
	connected-components-3d==4.1.1 blosc2==4.16.1 ndindex==1.10.1 msgpack==1.2.4 numexpr==2.14.2 \
	py-cpuinfo==9.0.0 platformdirs==4.14.9 pandas==3.1.1 pytz==2026.6 tzdata==2026.6 scikit-learn==1.9.1 \
	joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 seaborn==0.13.2 cloudpickle==3.1.3 einops==0.8.2 \
	future==1.0.0

$(BIN)/dicom-node: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(NNUNET_SERVING) $(NNUNET_TESTS)
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
