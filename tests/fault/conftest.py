"""Fixtures of the fault suite (``tests/fault``): the slow test model of the pipeline fault tests.

The suite's shared code lives in importable modules beside this file (``crash_trials``,
``acking_sender``, ``pipeline_setup``, ``private_servers``, the fuzzers), so that
``bench/fault.py`` runs the same code at length.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_setup import write_slow_threshold_bundle


@pytest.fixture(scope="session")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The threshold MONAI bundle whose post-processing waits ``inference_delay_seconds`` (see ``pipeline_setup``)."""
    return write_slow_threshold_bundle(tmp_path_factory.mktemp("slow_threshold_bundle"))
