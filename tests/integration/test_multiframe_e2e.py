"""An enhanced multi-frame CT gets the same AI as the classic series it was converted from (issue 21).

A PACS (real Orthanc) auto-routes two studies of the same chest phantom to the node: the
classic single-frame series, and the same slices as one Legacy Converted Enhanced CT
instance (a second study: new Study, Series and SOP Instance UIDs). Until the default rule
counted slices, the enhanced study was ignored with "instance_count 1 is not >= 10". Both
must now be routed by the built-in rule, and their results (SEG segments and their voxel
counts, detected nodules) must agree. Embedded mode: one Orthanc, one node, both studies.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from peers import NodeProcess, Orthanc, wait_for
from auto_routing import pacs_routing_to_node
from test_pipeline_e2e import finding_centres
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom

PIPELINES = ("chest-ct-segmentation", "lung-nodule-detection")
TERMINAL = ("succeeded", "dead", "cancelled", "not_applicable", "held", "released", "discarded")
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class TwoStudies:
    classic_uid: str
    classic_files: list[Path]
    enhanced_uid: str
    enhanced_file: Path


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory: pytest.TempPathFactory) -> TwoStudies:
    """The e2e test's chest phantom (two nodules of 12-18 mm) as a classic and as an enhanced multi-frame CT."""
    phantom = generate_chest_phantom(PhantomConfig(nodule_count=(2, 2), nodule_diameter_mm=(12.0, 18.0)), seed=4242)
    work = tmp_path_factory.mktemp("multiframe")
    series_dir, _ = write_dicom_case(phantom, work / "case", seed=4242)
    files = sorted(series_dir.glob("*.dcm"))
    legacy = [pydicom.dcmread(path) for path in files]
    enhanced_uid = generate_uid()
    slices = []
    for ds in legacy:
        moved = copy.deepcopy(ds)
        moved.StudyInstanceUID = enhanced_uid
        moved.SOPInstanceUID = generate_uid()
        slices.append(moved)
    converted = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(),
        instance_number=1)
    converted.BodyPartExamined = legacy[0].BodyPartExamined  # highdicom moves it into the frame anatomy
    assert int(converted.NumberOfFrames) == len(files)
    enhanced_file = work / "enhanced.dcm"
    converted.save_as(enhanced_file, enforce_file_format=True)
    return TwoStudies(str(legacy[0].StudyInstanceUID), files, enhanced_uid, enhanced_file)


@pytest.fixture
def orthanc_and_node(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    with pacs_routing_to_node(tmp_path, "multiframe") as pair:
        yield pair


def study_jobs(node: NodeProcess, study_uid: str) -> list[tuple[int, str, str, str | None]]:
    """(id, pipeline, state, error) of the study's jobs, by pipeline."""
    return [tuple(row) for row in node.query(  # type: ignore[misc]
        "SELECT j.id, j.pipeline, j.state, j.error FROM jobs j JOIN studies s ON s.id = j.study_id "
        "WHERE s.study_instance_uid = ? ORDER BY j.pipeline", (study_uid,))]


def delivered_results(orthanc: Orthanc, node: NodeProcess, job_id: int) -> list[pydicom.Dataset]:
    """The result objects of a job, as Orthanc holds them (sent there by the node)."""
    uids = [row[0] for row in node.query("SELECT sop_instance_uid FROM result_objects WHERE job_id = ?", (job_id,))]
    assert uids, f"job {job_id} made no result objects"
    found = []
    for uid in uids:
        orthanc_id = wait_for(f"result {uid} in Orthanc", lambda uid=uid: orthanc.lookup_instance(uid), timeout=60)
        found.append(pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id))))
    return found


def segment_voxels(seg: pydicom.Dataset) -> dict[str, int]:
    """Voxels per segment (by label) of a BINARY SEG."""
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    counts = dict.fromkeys(labels.values(), 0)
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[labels[number]] += int(np.count_nonzero(frame))
    return counts


@pytest.mark.slow
def test_an_enhanced_multi_frame_ct_is_routed_and_gets_the_same_results_as_its_classic_series(
    two_studies: TwoStudies, orthanc_and_node: tuple[Orthanc, NodeProcess]
) -> None:
    orthanc, node = orthanc_and_node
    orthanc.upload_files([*two_studies.classic_files, two_studies.enhanced_file])

    def finished() -> dict[str, list[tuple[int, str, str, str | None]]] | None:
        jobs = {uid: study_jobs(node, uid) for uid in (two_studies.classic_uid, two_studies.enhanced_uid)}
        done = all(len(rows) == len(PIPELINES) and all(r[2] in TERMINAL for r in rows) for rows in jobs.values())
        return jobs if done else None

    try:
        jobs = wait_for("both studies' jobs finished on the node", finished, timeout=240, interval=1.0)
    except AssertionError:
        states = node.query("SELECT study_instance_uid, state FROM studies")
        events = node.query("SELECT e.kind, e.detail FROM study_events e WHERE e.kind IN ('routed', 'ignored')")
        raise AssertionError(f"studies {states}; routing events {events}") from None
    for uid, rows in jobs.items():
        assert [(pipeline, state) for _, pipeline, state, _ in rows] == [(p, "succeeded") for p in PIPELINES], (
            uid, rows, node.query("SELECT pipeline, checks FROM jobs"))

    enhanced_series = node.query(
        "SELECT DISTINCT j.series_instance_uid FROM jobs j JOIN studies s ON s.id = j.study_id "
        "WHERE s.study_instance_uid = ?", (two_studies.enhanced_uid,))
    assert enhanced_series == [(str(pydicom.dcmread(two_studies.enhanced_file,
                                                    stop_before_pixels=True).SeriesInstanceUID),)]

    results = {uid: {pipeline: delivered_results(orthanc, node, job_id) for job_id, pipeline, _, _ in rows}
               for uid, rows in jobs.items()}
    classic, enhanced = results[two_studies.classic_uid], results[two_studies.enhanced_uid]
    for objects in enhanced.values():
        assert {str(ds.StudyInstanceUID) for ds in objects} == {two_studies.enhanced_uid}

    # Segmentation: the same segments with the same voxel counts (within 1 %).
    [classic_seg] = [ds for ds in classic["chest-ct-segmentation"] if ds.SOPClassUID == SEG]
    [enhanced_seg] = [ds for ds in enhanced["chest-ct-segmentation"] if ds.SOPClassUID == SEG]
    classic_voxels, enhanced_voxels = segment_voxels(classic_seg), segment_voxels(enhanced_seg)
    assert {"Lung", "Heart"} <= {str(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
                                 for s in enhanced_seg.SegmentSequence}
    assert set(enhanced_voxels) == set(classic_voxels) and all(classic_voxels.values()), classic_voxels
    for label, count in classic_voxels.items():
        assert abs(enhanced_voxels[label] - count) <= 0.01 * count, (label, count, enhanced_voxels[label])

    # Detection: as many nodules, each within 2 mm of its classic twin.
    classic_points = [p for ds in classic["lung-nodule-detection"] for p in finding_centres(ds)]
    enhanced_points = [p for ds in enhanced["lung-nodule-detection"] for p in finding_centres(ds)]
    assert classic_points and len(enhanced_points) == len(classic_points)
    for point in enhanced_points:
        distance = min(float(np.linalg.norm(point - other)) for other in classic_points)
        assert distance <= 2.0, (point, distance)

    stages = [json.loads(r[0]) for r in node.query("SELECT stage_seconds FROM jobs ORDER BY id")]
    print(f"voxels classic {classic_voxels} enhanced {enhanced_voxels}; {len(classic_points)} detections; "
          f"job stage seconds {stages}")  # a record in the test log (-s)
