"""A node with a real (small, deliberately slow) model and a real PACS, for the pipeline fault tests.

Why: a fault "mid-job" needs a job that lasts long enough to be interrupted, whatever
the load of the machine, and the demo models take tens of seconds per study on a
CPU. The model here is a real MONAI bundle run by the node's own bundle loader: the
threshold network of ``tests/unit/workers/model_fixtures.py`` (a 1x1x1 convolution that
labels voxels above 0 HU), whose post-processing waits ``inference_delay_seconds``
(a bundle config item, set per test through the models file's ``overrides``) - a
stand-in for a long inference on a GPU. Its results are a SEG and an SR, like the
demo segmentation model's.

:func:`result_series_in_pacs` counts what reached the PACS per job, which is how the
tests tell "delivered once" from "delivered twice" (two SEG series for one job).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from peers import Orthanc
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

__all__ = [
    "MODEL_ID",
    "pipeline_settings",
    "result_series_in_pacs",
    "delivered_once",
    "small_ct",
    "write_slow_threshold_bundle",
]

#: The model id routing rules name.
MODEL_ID = "slow-threshold"


def write_slow_threshold_bundle(out: Path) -> Path:
    """The threshold bundle with a post-processing step that sleeps ``inference_delay_seconds`` (default 0)."""
    from tests.unit.workers.model_fixtures import write_threshold_bundle

    bundle = write_threshold_bundle(out, spacing_mm=(6.0, 6.0, 6.0), roi_size=(16, 16, 16))
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["imports"] = [*config.get("imports", []), "$import time"]
    config["inference_delay_seconds"] = 0.0
    activation = config["postprocessing"]["transforms"][0]
    if activation.get("_target_") != "Activationsd":
        raise ValueError(f"{config_path}: the first post-processing transform is {activation!r}, not Activationsd")
    activation["other"] = "$lambda pred: time.sleep(@inference_delay_seconds) or pred"  # runs on every prediction
    config_path.write_text(json.dumps(config, indent=2))
    return bundle


def pipeline_settings(
    work: Path,
    *,
    bundle: Path,
    destination_port: int,
    inference_delay_seconds: float = 0.0,
    worker_queues: tuple[str, ...] = ("gpu", "io"),
) -> dict[str, Any]:
    """Settings overrides (for :class:`peers.NodeProcess`) of a node that runs the slow model on every CT study
    and sends the results to the PACS on ``destination_port`` (AE ``PACS``), from files written to ``work``.

    ``worker_queues`` are the embedded worker's queues (``()`` when ``dicom-node worker``
    processes do the work); short leases, sweeps and backoffs make recovery quick. More
    settings can be added as dotted keys (``{**pipeline_settings(...), "queue.broker_url": url}``).
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "rules.yaml").write_text(yaml.safe_dump({"rules": [{
        "name": "ct", "pipelines": [MODEL_ID], "conditions": [{"attribute": "modality", "in": ["CT"]}]}]}))
    (work / "destinations.yaml").write_text(yaml.safe_dump({"destinations": [{
        "type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": destination_port,
        "default": True}]}))
    (work / "models.yaml").write_text(yaml.safe_dump({"models": [{
        "id": MODEL_ID, "kind": "segmentation", "format": "monai_bundle", "path": str(bundle), "version": "0.1.0",
        "overrides": {"inference_delay_seconds": float(inference_delay_seconds)}}]}))
    return {
        "routing": {"rules_file": str(work / "rules.yaml"), "destinations_file": str(work / "destinations.yaml"),
                    "models_file": str(work / "models.yaml"), "job_lease_seconds": 3.0},
        "queue": {"embedded_worker_queues": list(worker_queues), "sweep_interval_seconds": 0.2,
                  "resend_after_seconds": 2.0},
        "delivery": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0, "max_attempts": 50,
                     "lease_seconds": 5.0},
    }


def small_ct(work: Path, seed: int, slices: int = 16) -> GeneratedSeries:
    """A small CT series (48 x 48, 6 mm voxels) in a study of its own, written under ``work``."""
    geometry = SeriesGeometry(rows=48, columns=48, slices=slices, pixel_spacing=(6.0, 6.0), slice_spacing=6.0,
                              slice_thickness=6.0)
    return generate_ct_series(work / f"ct{seed}", geometry=geometry, seed=seed)


def result_series_in_pacs(orthanc: Orthanc, study_uid: str) -> dict[str, list[tuple[str, int]]]:
    """The result series the PACS holds in a study: modality -> [(Series Instance UID, instances)], CT left out.

    One job of the slow model delivered once is one SEG series and one SR series of
    one instance each; a job run or delivered twice shows up as two series of a kind.
    """
    study_id = orthanc.lookup_study(study_uid)
    if study_id is None:
        return {}
    found: dict[str, list[tuple[str, int]]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        tags = series["MainDicomTags"]
        if tags.get("Modality") == "CT":
            continue
        found.setdefault(tags.get("Modality", "?"), []).append((tags["SeriesInstanceUID"], len(series["Instances"])))
    return found


def delivered_once(found: Mapping[str, list[tuple[str, int]]], expected_series: Mapping[str, str]) -> list[str]:
    """What is wrong with ``found`` (from :func:`result_series_in_pacs`) when each kind in ``expected_series``
    (kind -> the Series Instance UID the node recorded for the job) must be there exactly once, one instance."""
    problems = []
    kinds = Counter({kind: len(series) for kind, series in found.items()})
    for kind, series_uid in expected_series.items():
        if kinds[kind] != 1:
            problems.append(f"{kinds[kind]} {kind} series in the PACS, expected 1: {found.get(kind)}")
        elif found[kind][0] != (series_uid, 1):
            problems.append(f"{kind} in the PACS is {found[kind][0]}, expected ({series_uid}, 1)")
    problems += [f"unexpected {kind} series in the PACS: {found[kind]}" for kind in found if kind not in expected_series]
    return problems
