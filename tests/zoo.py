"""Where the tests find MONAI Model Zoo bundle configs (real configs, not our own), and what happens without them.

The configs live outside the repository (``../shared/monai-bundles`` beside the checkout, or the folder named by
``DICOM_NODE_ZOO_CONFIGS``). In a fresh clone with nothing beside it, the tests that need them skip with a message
naming the path they looked at; in CI (``CI=true``) a missing folder fails those tests, so that CI never passes
without running them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ZOO_ENV = "DICOM_NODE_ZOO_CONFIGS"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_ZOO = REPO.parent / "shared" / "monai-bundles"


def zoo_configs() -> Path:
    """The folder of Model Zoo bundles: ``$DICOM_NODE_ZOO_CONFIGS``, else ``../shared/monai-bundles``."""
    configured = os.environ.get(ZOO_ENV, "").strip()
    return Path(configured) if configured else DEFAULT_ZOO


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def model_zoo_bundle(name: str) -> Path:
    """The Model Zoo bundle ``name`` (a folder with ``configs/``); skips the calling test when it is absent, or
    fails it in CI."""
    bundle = zoo_configs() / name
    if (bundle / "configs").is_dir():
        return bundle
    message = (f"Model Zoo bundle configs not found: {bundle} (set {ZOO_ENV} to the folder holding "
               f"{name}/configs, default {DEFAULT_ZOO})")
    if in_ci():
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)
