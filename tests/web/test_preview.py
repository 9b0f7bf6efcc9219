"""The study preview PNG: key slice choice, overlay from a real SEG in the outbox, detections, cache, bad data.

The SEG is built with the workers' own ``build_seg`` from the series as the node
stored it (loaded with ``workers.volume.load_series``), written to the outbox and
recorded with ``finish_job``, exactly as the pipeline does.
"""

from __future__ import annotations

import io
import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image

from dicom_node.db import jobs
from dicom_node.spool import Spool
from dicom_node.study_store import FileStudyStore
from tests.unit.workers.outputs_fixtures import ALGORITHM, LABELS, sphere_mask
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from tests.web.studies_fixtures import T0, complete_and_route, ingest, write_study
from training.phantoms.ct_series import SeriesGeometry
from workers.models.base import SegmentationResult
from workers.outputs.common import SeriesIdentity
from workers.outputs.seg import build_seg
from workers.volume import Volume, load_series

#: Not square, so a transposed picture is caught: 40 rows x 48 columns, 10 slices.
GEOMETRY = SeriesGeometry(rows=40, columns=48, slices=10, pixel_spacing=(5.0, 5.0), slice_spacing=5.0,
                          slice_thickness=5.0)
LUNG, NODULE = LABELS[1], LABELS[4]
NODULE_AT = (7, 25, 30)  # slice, row, column of the nodule's centre
IDENTITY = SeriesIdentity(series_number=901, series_description="AI chest organs", manufacturer="Test AI")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("preview")
    common = {"geometry": GEOMETRY, "study_date": "20260301", "description": "CT chest"}
    return {
        "seg": write_study(root / "seg", seed=41, patient_id="PV-1", patient_name="Seg^Study", accession="PV1",
                           **common),  # type: ignore[arg-type]
        "plain": write_study(root / "plain", seed=42, patient_id="PV-2", patient_name="Plain^Study",
                             accession="PV2", **common),  # type: ignore[arg-type]
    }


def uid_of(paths: list[Path]) -> tuple[str, str]:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def stored_volume(env: WebEnv, series_uid: str) -> Volume:
    """The series as the node stored it, loaded as the workers load it."""
    return load_series(FileStudyStore(env.sessions, env.settings.spool_dir).series_files(series_uid))


def label_map(volume: Volume, *, nodule: bool = True) -> npt.NDArray[np.uint8]:
    """A large lung box on slices 1-3 (most segmented area there) and a small nodule sphere on slices 6-8."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[1:4, 8:30, 8:36] = LUNG.value  # a third of the slice: filled, not only outlined
    if nodule:
        labels[sphere_mask(volume, volume.index_to_world(NODULE_AT), 6.0)] = NODULE.value
    return labels


def segment_study(env: WebEnv, study_uid: str, series_uid: str, *, nodule: bool = True,
                  summary: dict[str, object] | None = None, pipeline: str = "chest-seg") -> tuple[int, Path]:
    """Route the study to a segmentation job and finish it as the worker would, with a real SEG in the outbox."""
    [job_id] = complete_and_route(env.sessions, study_uid, series_uid, [pipeline], at=T0 + timedelta(minutes=1))
    return finish_with_seg(env, job_id, series_uid, nodule=nodule, summary=summary)


def finish_with_seg(env: WebEnv, job_id: int, series_uid: str, *, nodule: bool = True,
                    summary: dict[str, object] | None = None) -> tuple[int, Path]:
    assert jobs.claim_job(env.sessions, job_id, worker="w", now=T0 + timedelta(minutes=2), lease_seconds=60)
    volume = stored_volume(env, series_uid)
    seg = build_seg(volume, SegmentationResult(label_map(volume, nodule=nodule), LABELS), ALGORITHM, IDENTITY)
    assert seg is not None
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    relative = f"job-{job_id}/seg-{seg.SOPInstanceUID}.dcm"
    stored = Spool(env.settings.outbox_dir, fsync=False).write(relative, [buffer.getvalue()])
    jobs.finish_job(env.sessions, job_id, now=T0 + timedelta(minutes=3), stage_seconds={"inference": 1.0},
                    summary=summary or {"kind": "segmentation", "volumes_ml": {"lung": 500.0}},
                    results=[jobs.ResultSpec("SEG", str(seg.SOPClassUID), str(seg.SOPInstanceUID),
                                             str(seg.SeriesInstanceUID), relative)],
                    destinations=[], delivery_max_attempts=1)
    return job_id, stored.path


def picture(answer: object) -> npt.NDArray[np.uint8]:
    assert answer.status_code == 200, answer.text  # type: ignore[attr-defined]
    assert answer.headers["content-type"] == "image/png"  # type: ignore[attr-defined]
    image = Image.open(io.BytesIO(answer.content))  # type: ignore[attr-defined]
    image.load()
    return np.asarray(image.convert("RGB"))


def coloured(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Pixels that are not grey (the source image is greyscale, so these are overlay)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r != g) | (g != b)


def test_preview_shows_the_seg_on_the_slice_with_most_lesion(
    web: WebEnv, viewer: LoggedIn, files: dict[str, list[Path]]
) -> None:
    ingest(web, files["seg"], calling_ae="PACS", at=T0)
    study, series = uid_of(files["seg"])
    segment_study(web, study, series)

    answer = viewer.client.get(f"/studies/{study}/preview.png")
    rgb = picture(answer)
    assert rgb.shape == (GEOMETRY.rows, GEOMETRY.columns, 3)  # native matrix, not upscaled
    assert answer.headers["x-preview-slice"] == f"{NODULE_AT[0] + 1}/{GEOMETRY.slices}"  # lesion beats larger lung
    assert answer.headers["x-preview-overlay"] == "yes" and answer.headers["x-preview-series"] == series
    _, row, column = NODULE_AT
    assert coloured(rgb)[row, column]
    r, g, b = rgb[row, column].astype(int)
    assert r > b + 60 and g > b + 60  # blended towards the nodule's yellow (255, 230, 0)
    assert not coloured(rgb)[0:4, 0:4].any()  # the corner is not segmented
    assert coloured(rgb).sum() < rgb.shape[0] * rgb.shape[1] / 4  # only the nodule on this slice

    cached = list((web.data_dir / "previews").glob("*.png"))
    assert len(cached) == 1
    again = viewer.client.get(f"/api/v1/studies/{study}/preview.png")
    assert again.content == answer.content and list((web.data_dir / "previews").glob("*.png")) == cached


def test_preview_without_lesion_picks_most_segmented_and_detections_win(
    web: WebEnv, viewer: LoggedIn, files: dict[str, list[Path]]
) -> None:
    ingest(web, files["seg"], calling_ae="PACS", at=T0)
    study, series = uid_of(files["seg"])
    segment_study(web, study, series, nodule=False)
    first = viewer.client.get(f"/studies/{study}/preview.png")
    rgb = picture(first)
    assert first.headers["x-preview-slice"] in {"2/10", "3/10", "4/10"}  # the lung box's slices
    assert coloured(rgb)[20, 20] and not coloured(rgb)[38, 46]

    # A detection job on the same series: its largest finding decides the slice, circled in yellow.
    [job_id] = jobs.record_routing(  # the study is routed; add a second pipeline as a re-route would
        web.sessions, _reopen_for_routing(web, study), _decision("nodules", series), now=T0 + timedelta(minutes=5),
        max_attempts=1)
    volume = stored_volume(web, series)
    centre = [float(v) for v in volume.index_to_world((8, 20, 24))]
    small = [float(v) for v in volume.index_to_world((2, 10, 10))]
    assert jobs.claim_job(web.sessions, job_id, worker="w", now=T0 + timedelta(minutes=6), lease_seconds=60)
    jobs.finish_job(web.sessions, job_id, now=T0 + timedelta(minutes=7), stage_seconds={"inference": 2.0},
                    summary={"kind": "detection", "findings": 2, "detections": [
                        {"centre_mm": small, "diameter_mm": 6.0, "score": 0.5},
                        {"centre_mm": centre, "diameter_mm": 20.0, "score": 0.9}]},
                    results=[], destinations=[], delivery_max_attempts=1)
    second = viewer.client.get(f"/studies/{study}/preview.png")
    rgb = picture(second)
    assert second.headers["x-preview-slice"] == "9/10"
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 180) & (rgb[..., 2] < 80)
    rows, columns = np.nonzero(yellow)
    assert len(rows) > 8 and abs(rows.mean() - 20) < 2 and abs(columns.mean() - 24) < 2  # circle around (20, 24)
    assert not yellow[20, 24]  # an outline, not a disc
    assert len(list((web.data_dir / "previews").glob("*.png"))) == 1  # the old picture was replaced

    page = viewer.client.get(f"/studies/{study}").text
    assert f'src="/studies/{study}/preview.png"' in page and "20.0 mm" in page and "90 %" in page


def _reopen_for_routing(env: WebEnv, study_uid: str) -> int:
    """Put a routed study back to complete (as a late instance and a new completion would) and give its id."""
    from sqlalchemy import select, update

    from dicom_node.db.models import Study

    with env.sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == study_uid).values(state="complete"))
        return int(session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid)))


def _decision(pipeline: str, series_uid: str):  # type: ignore[no-untyped-def]
    from dicom_node.routing import JobSpec, RoutingDecision

    return RoutingDecision(jobs=(JobSpec(pipeline=pipeline, series_instance_uid=series_uid, rule="r", priority=0,
                                         destinations="default"),), outcomes=())


def test_preview_of_a_study_without_results_is_the_plain_middle_slice(
    web: WebEnv, viewer: LoggedIn, files: dict[str, list[Path]]
) -> None:
    ingest(web, files["plain"], calling_ae="PACS", at=T0)
    study, _ = uid_of(files["plain"])
    answer = viewer.client.get(f"/studies/{study}/preview.png")
    rgb = picture(answer)
    assert rgb.shape == (GEOMETRY.rows, GEOMETRY.columns, 3)
    assert answer.headers["x-preview-slice"] == "6/10" and answer.headers["x-preview-overlay"] == "no"
    assert not coloured(rgb).any()
    assert rgb.std() > 10  # an image, not a blank: lung window shows body, lungs and air
    token = {"Authorization": f"Bearer {web.token('viewer')}"}
    assert web.client().get(f"/api/v1/studies/{study}/preview.png", headers=token).content == answer.content
    assert web.client().get(f"/api/v1/studies/{study}/preview.png").status_code == 401


def test_results_sent_back_are_no_image_and_a_seg_only_study_has_no_preview(
    tmp_path: Path, files: dict[str, list[Path]]
) -> None:
    env = make_web_env(tmp_path)
    ingest(env, files["seg"], calling_ae="PACS", at=T0)
    study, series = uid_of(files["seg"])
    _, seg_path = segment_study(env, study, series)
    ingest(env, [seg_path], calling_ae="ORTHANC", at=T0 + timedelta(minutes=10))  # the PACS forwards it back
    token = {"Authorization": f"Bearer {env.token('viewer')}"}
    client = env.client()
    detail = client.get(f"/api/v1/studies/{study}", headers=token).json()
    assert [(s["modality"], s["is_result"]) for s in detail["series"]] == [("CT", False), ("SEG", True)]
    assert [i["study_instance_uid"] for i in client.get(
        "/api/v1/studies", params={"modality": "SEG"}, headers=token).json()["items"]] == [study]
    assert client.get(f"/api/v1/studies/{study}/preview.png", headers=token).headers["x-preview-series"] == series

    other = make_web_env(tmp_path / "other")
    ingest(other, [seg_path], calling_ae="ORTHANC", at=T0)
    token = {"Authorization": f"Bearer {other.token('viewer')}"}
    answer = other.client().get(f"/api/v1/studies/{study}/preview.png", headers=token)
    assert answer.status_code == 404 and "no image series" in answer.json()["detail"]
    unknown = other.client().get("/api/v1/studies/1.2.3.999/preview.png", headers=token)
    assert unknown.status_code == 404 and "not known" in unknown.json()["detail"]


def test_bad_source_or_seg_gives_422_and_a_warning(
    web: WebEnv, viewer: LoggedIn, files: dict[str, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    ingest(web, files["seg"], calling_ae="PACS", at=T0)
    study, series = uid_of(files["seg"])
    _, seg_path = segment_study(web, study, series)
    seg_path.write_bytes(b"DICM? no: " + b"\0" * 200)
    with caplog.at_level(logging.WARNING, logger="dicom_node.web.preview"):
        answer = viewer.client.get(f"/api/v1/studies/{study}/preview.png")
    assert answer.status_code == 422 and "SEG" in answer.json()["detail"] and "cannot be read" in answer.json()["detail"]
    assert any("SEG" in r.getMessage() for r in caplog.records)
    seg_path.unlink()
    missing = viewer.client.get(f"/studies/{study}/preview.png")
    assert missing.status_code == 422 and "missing from the outbox" in missing.text

    ingest(web, files["plain"], calling_ae="PACS", at=T0)
    plain, plain_series = uid_of(files["plain"])
    victim = FileStudyStore(web.sessions, web.settings.spool_dir).series_files(plain_series)[3]
    victim.write_bytes(victim.read_bytes()[:400])  # truncated by a broken disk
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dicom_node.web.preview"):
        broken = viewer.client.get(f"/api/v1/studies/{plain}/preview.png")
    assert broken.status_code == 422 and plain_series in broken.json()["detail"]
    assert any(plain_series in r.getMessage() for r in caplog.records)


def test_a_multi_frame_series_previews_like_its_single_frame_original(
    tmp_path: Path, files: dict[str, list[Path]]
) -> None:
    """One enhanced (legacy converted) CT instance whose frames are the slices, stored in shuffled order: the
    preview reads each frame's place and rescale from the functional groups and decodes only the key frame."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(path) for path in files["plain"]]
    shuffled = [datasets[i] for i in (4, 9, 0, 7, 2, 5, 8, 1, 6, 3)]
    enhanced = LegacyConvertedEnhancedCTImage(shuffled, series_instance_uid=generate_uid(), series_number=99,
                                              sop_instance_uid=generate_uid(), instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    answers = []
    for name, paths in (("single", files["plain"]), ("multi", [path])):
        env = make_web_env(tmp_path / name)
        ingest(env, paths, calling_ae="PACS", at=T0)
        token = {"Authorization": f"Bearer {env.token('viewer')}"}
        answers.append(env.client().get(f"/api/v1/studies/{uid_of(paths)[0]}/preview.png", headers=token))
    single, multi = answers
    assert multi.headers["x-preview-series"] == enhanced.SeriesInstanceUID
    assert multi.headers["x-preview-slice"] == single.headers["x-preview-slice"] == "6/10"
    assert np.array_equal(picture(multi), picture(single))


def test_a_series_with_a_missing_slice_gives_422_naming_it(
    web: WebEnv, viewer: LoggedIn, files: dict[str, list[Path]]
) -> None:
    ingest(web, files["plain"][:4] + files["plain"][5:], calling_ae="PACS", at=T0)
    study, series = uid_of(files["plain"])
    answer = viewer.client.get(f"/api/v1/studies/{study}/preview.png")
    assert answer.status_code == 422, answer.text
    assert series in answer.json()["detail"] and "not one regular stack" in answer.json()["detail"]
