"""The state the browser scenario needs, made the way the node makes it.

Why: the admin UI must be tested on what a running node really holds. The study
arrives over DICOM (DCMTK ``storescu`` to the node's own SCP) and is completed and
routed by the node's own completion monitor and conductor (the built-in default
rule); the worker's part (a real DICOM SEG and the worker's own preview picture written to
the outbox, the job finished)
and a delivery that fails until it is dead are done with the same
``dicom_node.db.jobs`` functions the workers and the dispatcher call. Nothing
here patches the application.
"""

from __future__ import annotations

import io
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dicom_node.db import config_repo, job_views, jobs
from dicom_node.destinations import DicomDestination
from dicom_node.ingest import utc_now
from dicom_node.app.node import Node
from dicom_node.spool import Spool
from dicom_node.study_store import FileStudyStore
from tests.integration.peers import run_tool, wait_for
from tests.unit.workers.outputs_fixtures import ALGORITHM, LABELS, sphere_mask
from workers.models.base import SegmentationResult
from workers.outputs.common import SeriesIdentity
from workers.outputs.preview import render_preview
from workers.outputs.seg import build_seg
from workers.volume import Volume, load_series

__all__ = ["DESTINATION", "deliver_until_dead", "finish_with_detections", "finish_with_seg", "make_destination",
           "send_study", "wait_for_jobs"]

logger = logging.getLogger(__name__)

#: The destination the failed delivery goes to (a port nobody listens on).
DESTINATION = "pacs-main"
LUNG, NODULE = LABELS[1], LABELS[4]
IDENTITY = SeriesIdentity(series_number=901, series_description="AI chest organs", manufacturer="Browser test AI")


def make_destination(node: Node) -> None:
    """A default DICOM destination, so the default rule's jobs deliver there and the destinations page has a row."""
    config_repo.upsert_destination(
        node.sessions,
        DicomDestination(name=DESTINATION, ae_title="PACS_MAIN", host="127.0.0.1", port=9, timeout_seconds=1,
                         default=True),
        source="browser test", now=utc_now(),
    )


def send_study(node: Node, paths: list[Path], *, calling_ae: str = "CT_SCANNER") -> None:
    """C-STORE ``paths`` to the node with DCMTK ``storescu`` (one association)."""
    answer = run_tool(["storescu", "-to", "30", "-aet", calling_ae, "-aec", node.settings.dicom.ae_title,
                       "127.0.0.1", str(node.scp.port), *map(str, paths)], timeout=60)
    assert answer.returncode == 0, f"storescu failed ({answer.returncode}): {answer.stderr[-2000:]}"


def wait_for_jobs(node: Node, study_uid: str, count: int, timeout: float = 20.0) -> list[job_views.JobRow]:
    """The study's jobs once the node has completed and routed it into ``count`` jobs."""
    return wait_for(f"{count} job(s) for study {study_uid}",
                    lambda: (found if len(found := job_views.list_jobs(
                        node.sessions, study_instance_uid=study_uid).items) >= count else None), timeout=timeout)


def _stored_volume(node: Node, series_uid: str) -> Volume:
    return load_series(FileStudyStore(node.sessions, node.settings.spool_dir).series_files(series_uid))


def _label_map(volume: Volume) -> npt.NDArray[np.uint8]:
    """Lungs as two boxes on the middle slices and a 10 mm nodule in the right one."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    slices, rows, columns = volume.shape
    labels[2:slices - 2, rows // 4:3 * rows // 4, columns // 8:3 * columns // 8] = LUNG.value
    labels[2:slices - 2, rows // 4:3 * rows // 4, 5 * columns // 8:7 * columns // 8] = LUNG.value
    nodule_at = (slices // 2, rows // 2, 3 * columns // 4)
    labels[sphere_mask(volume, volume.index_to_world(nodule_at), 5.0)] = NODULE.value
    return labels


def finish_with_seg(node: Node, job_id: int, series_uid: str, destinations: list[str]) -> list[int]:
    """Run the job's worker part by hand: claim, a real SEG into the outbox, finish; returns the delivery ids."""
    start = utc_now()
    assert jobs.claim_job(node.sessions, job_id, worker="browser-test:1", now=start, lease_seconds=60)
    volume = _stored_volume(node, series_uid)
    result = SegmentationResult(_label_map(volume), LABELS)
    seg = build_seg(volume, result, ALGORITHM, IDENTITY)
    assert seg is not None, "build_seg made no SEG from a label map with lungs and a nodule"
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    relative = f"job-{job_id}/seg-{seg.SOPInstanceUID}.dcm"
    outbox = Spool(node.settings.outbox_dir, fsync=False)
    outbox.write(relative, [buffer.getvalue()])
    preview: dict[str, str] = {}
    for role, (name, data) in render_preview(volume, result, ALGORITHM).files().items():  # as the worker draws it
        preview[role] = f"job-{job_id}/{name}"
        outbox.write(preview[role], [data])
    stages = {"load": 0.18, "model_load": 0.52, "inference": 0.61, "encoding": 0.09, "outbox": 0.02}
    finished = start + timedelta(seconds=sum(stages.values()))
    _wait_until(finished)  # what happens next (the delivery's attempts) is stamped later, as it really would be
    return jobs.finish_job(
        node.sessions, job_id, now=finished, stage_seconds=stages,
        summary={"kind": "segmentation", "volumes_ml": {"lung": 2310.4, "lung nodule": 0.5}, "preview": preview},
        results=[jobs.ResultSpec("SEG", str(seg.SOPClassUID), str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID),
                                 relative)],
        destinations=destinations, delivery_max_attempts=2,
    )


def finish_with_detections(node: Node, job_id: int, series_uid: str) -> None:
    """A detection job that found one nodule (summary only; no result objects, no deliveries)."""
    start = utc_now()
    assert jobs.claim_job(node.sessions, job_id, worker="browser-test:1", now=start, lease_seconds=60)
    volume = _stored_volume(node, series_uid)
    slices, rows, columns = volume.shape
    centre = [float(v) for v in volume.index_to_world((slices // 2, rows // 2, 3 * columns // 4))]
    finished = start + timedelta(seconds=0.8)
    _wait_until(finished)
    jobs.finish_job(node.sessions, job_id, now=finished, stage_seconds={"inference": 0.7},
                    summary={"kind": "detection", "findings": 1,
                             "detections": [{"centre_mm": centre, "diameter_mm": 10.0, "score": 0.87}]},
                    results=[], destinations=[], delivery_max_attempts=1)


def _wait_until(moment: datetime) -> None:
    """Sleep until the wall clock has passed ``moment`` (the node's own clock is the wall clock)."""
    time.sleep(max(0.0, (moment - utc_now()).total_seconds()) + 0.01)


def deliver_until_dead(node: Node, delivery_id: int, error: str) -> None:
    """Fail every attempt of the delivery as the dispatcher would (no backoff wait), until it is dead."""
    for _ in range(10):
        def claim() -> jobs.DeliveryClaim | None:
            jobs.due_deliveries(node.sessions, now=utc_now())  # a failed attempt whose backoff is over: pending
            return jobs.claim_delivery(node.sessions, delivery_id, now=utc_now(), lease_seconds=60)

        wait_for(f"delivery {delivery_id} to be claimable", claim, timeout=5.0)
        state, _ = jobs.fail_delivery(node.sessions, delivery_id, now=utc_now(), error=error, retryable=True,
                                      backoff_initial_seconds=0, backoff_max_seconds=0)
        if state == "dead":
            return
    raise AssertionError(f"delivery {delivery_id} did not become dead")
