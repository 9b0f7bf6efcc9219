"""Previews drawn by the worker, served by the web: the real path from a received study to the picture.

A chest CT phantom with two nodules is received through the node's ingest path,
routed, and its jobs are run by ``workers.pipeline.run_job`` with the shipped demo
nodule detector and the threshold segmentation bundle of
``tests/unit/workers/model_fixtures.py`` (which labels "bone" everywhere above 0 HU;
a stricter entry of the same bundle is held by its plausibility rule). The web app
then serves what the worker wrote: the tests look at the pixels (circle on the slice
through the largest detection, overlay colour, legend), at which job's picture is the
study's, and at the reasons given when there is none.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image

from dicom_node.db import jobs
from dicom_node.model_catalog import ModelEntry, demo_entries
from dicom_node.queue import CeleryQueue
from tests.unit.workers.model_fixtures import THRESHOLD_LABEL, write_threshold_bundle
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from tests.web.studies_fixtures import T0, complete_and_route, fail_job_dead, ingest
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import ChestPhantom, PhantomConfig, generate_chest_phantom
from workers.celery_app import make_celery_app
from workers.context import build_worker_context
from workers.models.registry import ModelRegistry
from workers.pipeline import run_job
from workers.volume import load_series

DETECTOR, SEGMENTER, STRICT = "lung-nodule-detection", "threshold-seg", "threshold-seg-strict"
#: The nodule's colour (the palette's orange, value 5), in the preview as in the SEG, GSPS and overlay series.
NODULE_RGB = (230, 159, 0)


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChestPhantom, list[Path]]:
    """A chest CT phantom with two nodules of 12-18 mm, as a DICOM series (the end-to-end test's)."""
    phantom = generate_chest_phantom(PhantomConfig(nodule_count=(2, 2), nodule_diameter_mm=(12.0, 18.0)), seed=4242)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("chest") / "case", seed=4242)
    return phantom, sorted(series_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """The demo detector, the threshold bundle, and the threshold bundle with a rule it always breaks."""
    bundle = write_threshold_bundle(tmp_path_factory.mktemp("threshold") / "bundle", spacing_mm=(5.0, 5.0, 5.0),
                                    roi_size=(32, 32, 16))
    detector = next(entry for entry in demo_entries() if entry.id == DETECTOR)
    plain = {"kind": "segmentation", "format": "monai_bundle", "path": str(bundle), "version": "0.1.0"}
    return ModelRegistry((detector, ModelEntry.model_validate({"id": SEGMENTER, **plain}),
                          ModelEntry.model_validate({"id": STRICT, **plain, "plausibility": {
                              "volumes_ml": {THRESHOLD_LABEL.name: {"max": 1.0}}}})),
                         base_dir=bundle.parent, source="preview test models")


def received(env: WebEnv, files: list[Path]) -> tuple[str, str]:
    ingest(env, files, calling_ae="PACS", at=T0)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def run_jobs(env: WebEnv, registry: ModelRegistry, study: str, series: str, pipelines: list[str]) -> list[int]:
    """Route the study to ``pipelines`` and run each job through the worker's pipeline; the job ids."""
    job_ids = complete_and_route(env.sessions, study, series, pipelines, at=T0 + timedelta(minutes=1))
    context = build_worker_context(env.settings, env.sessions, CeleryQueue(make_celery_app("memory://")), registry)
    for job_id in job_ids:
        run_job(context, job_id)
    assert context.encoder is not None and context.encoder.wait_idle(timeout=120), "the encoder finishes the jobs"
    return job_ids


def picture(answer: object) -> npt.NDArray[np.uint8]:
    assert answer.status_code == 200, answer.text  # type: ignore[attr-defined]
    assert answer.headers["content-type"] == "image/png"  # type: ignore[attr-defined]
    image = Image.open(io.BytesIO(answer.content))  # type: ignore[attr-defined]
    image.load()
    return np.asarray(image.convert("RGB"))


def test_the_worker_draws_each_jobs_preview_and_the_study_shows_the_detection(
    web: WebEnv, viewer: LoggedIn, chest: tuple[ChestPhantom, list[Path]], registry: ModelRegistry
) -> None:
    phantom, files = chest
    study, series = received(web, files)
    detection_job, segmentation_job = run_jobs(web, registry, study, series, [DETECTOR, SEGMENTER])
    api = viewer.client.get(f"/api/v1/studies/{study}").json()
    states = {j["id"]: j["state"] for j in api["jobs"]}
    assert states == {detection_job: "succeeded", segmentation_job: "succeeded"}, api["jobs"]

    # The detection job's picture: the slice through its largest finding, which is one of the phantom's nodules.
    volume = load_series(files)
    [found] = [j for j in api["jobs"] if j["id"] == detection_job]
    largest = max(found["summary"]["detections"], key=lambda d: d["diameter_mm"])
    k, row, column = volume.world_to_index(largest["centre_mm"])
    assert min(np.linalg.norm(np.asarray(n.centre_xyz_mm) - largest["centre_mm"]) for n in phantom.nodules) < 8.0
    answer = viewer.client.get(f"/jobs/{detection_job}/preview.png")
    rgb = picture(answer)
    rows, columns = volume.shape[1:]
    assert answer.headers["x-preview-job"] == str(detection_job) and answer.headers["x-preview-series"] == series
    assert answer.headers["x-preview-slice"] == f"{int(round(k)) + 1}/{volume.shape[0]}"
    assert answer.headers["x-preview-overlay"] == "yes"
    slice_rgb = rgb[:rows, :columns]
    circled = np.all(slice_rgb == NODULE_RGB, axis=-1)
    ys, xs = np.nonzero(circled)
    near = np.hypot(ys - row, xs - column) < largest["diameter_mm"] / 2 / volume.spacing_mm[1] + 3
    assert near.sum() > 12, "a circle in the nodule's colour around the largest detection"
    assert not circled[int(round(row)), int(round(column))], "an outline, not a disc"
    legend = rgb[rows:]
    assert legend.shape[0] > 40 and (legend.max(axis=-1) > 150).sum() > 300, "legend text under the slice"
    assert np.all(legend == NODULE_RGB, axis=-1).any(), "the finding's circle in the legend"
    r, g, b = (slice_rgb[..., i].astype(int) for i in range(3))
    grey = (r == g) & (g == b)
    assert grey.mean() > 0.95 and slice_rgb[grey].std() > 20, "the CT itself, greyscale, in a window showing it"

    # The segmentation job's picture: its label in the SEG's colour, on the most segmented slice.
    seg_answer = viewer.client.get(f"/api/v1/jobs/{segmentation_job}/preview.png",
                                   headers={"Authorization": f"Bearer {web.token('viewer')}"})
    seg_rgb = picture(seg_answer)[:rows, :columns]
    assert seg_answer.headers["x-preview-overlay"] == "yes"
    assert np.all(seg_rgb == THRESHOLD_LABEL.color_rgb, axis=-1).sum() > 50, "the label's outline in its colour"

    # The study's picture is the detection job's; the page shows it and links each job's own.
    study_answer = viewer.client.get(f"/studies/{study}/preview.png")
    assert study_answer.content == answer.content and study_answer.headers["x-preview-job"] == str(detection_job)
    assert viewer.client.get(api["preview_url"]).content == answer.content
    page = viewer.client.get(f"/studies/{study}").text
    assert f'src="/studies/{study}/preview.png"' in page and "preview-missing" not in page
    assert all(f'href="/jobs/{job_id}/preview.png"' in page for job_id in (detection_job, segmentation_job))

    # Beside the results in the outbox, never a result: only the DICOM objects are recorded (and so delivered).
    outbox = web.settings.outbox_dir
    for job_id in (detection_job, segmentation_job):
        results = jobs.results_of_job(web.sessions, job_id)
        assert results and all(r.path.endswith(".dcm") for r in results)
        assert (outbox / f"job-{job_id}" / "preview.png").is_file()
        facts = json.loads((outbox / f"job-{job_id}" / "preview.json").read_text())
        assert facts["series_instance_uid"] == series and facts["slice_count"] == volume.shape[0]
    assert web.client().get(f"/api/v1/jobs/{detection_job}/preview.png").status_code == 401


def test_held_results_have_their_own_preview_and_a_discarded_one_is_gone(
    web: WebEnv, viewer: LoggedIn, operator: LoggedIn, chest: tuple[ChestPhantom, list[Path]],
    registry: ModelRegistry
) -> None:
    _, files = chest
    study, series = received(web, files)
    [held] = run_jobs(web, registry, study, series, [STRICT])
    assert viewer.client.get(f"/api/v1/jobs/{held}").json()["state"] == "held"
    assert picture(viewer.client.get(f"/jobs/{held}/preview.png")).size
    study_answer = viewer.client.get(f"/api/v1/studies/{study}/preview.png")
    assert study_answer.status_code == 404
    assert "held for review" in study_answer.json()["detail"] and f"/jobs/{held}/preview.png" in study_answer.text
    page = viewer.client.get(f"/studies/{study}").text
    assert "preview-missing" in page and "held for review" in page and 'class="preview"' not in page

    held_folder = web.settings.outbox_dir / f"job-{held}"
    assert (held_folder / "preview.png").is_file()
    assert operator.post(f"/jobs/{held}/discard").status_code == 303
    gone = viewer.client.get(f"/jobs/{held}/preview.png")
    assert gone.status_code == 404 and "its held results were discarded" in gone.text
    assert not (held_folder / "preview.png").exists() and not (held_folder / "preview.json").exists()


def test_without_a_picture_the_page_and_the_api_say_why(
    tmp_path: Path, chest: tuple[ChestPhantom, list[Path]]
) -> None:
    env = make_web_env(tmp_path)
    _, files = chest
    study, series = received(env, files)
    viewer = env.login("viewer")
    client = viewer.client
    answer = client.get(f"/studies/{study}/preview.png")
    assert answer.status_code == 404 and "has no jobs yet" in answer.text

    queued, dead = complete_and_route(env.sessions, study, series, ["chest-seg", "nodules"],
                                      at=T0 + timedelta(minutes=1))
    fail_job_dead(env.sessions, dead, at=T0 + timedelta(minutes=2), error="model crashed")
    detail = client.get(f"/api/v1/studies/{study}/preview.png").json()["detail"]
    assert f"job {queued} (chest-seg) is queued" in detail and f"job {dead} (nodules) dead: model crashed" in detail
    page = client.get(f"/studies/{study}").text
    assert "preview-missing" in page and "model crashed" in page and 'class="preview"' not in page
    job_answer = client.get(f"/api/v1/jobs/{queued}/preview.png")
    assert job_answer.status_code == 404 and "is queued; its preview is drawn when it finishes" in job_answer.text
    assert client.get("/jobs/99999/preview.png").status_code == 404
    unknown = client.get("/api/v1/studies/1.2.3.999/preview.png")
    assert unknown.status_code == 404 and "not known" in unknown.json()["detail"]


def test_a_missing_or_damaged_preview_file_is_named_not_a_crash(
    web: WebEnv, viewer: LoggedIn, chest: tuple[ChestPhantom, list[Path]], registry: ModelRegistry
) -> None:
    _, files = chest
    study, series = received(web, files)
    [job_id] = run_jobs(web, registry, study, series, [SEGMENTER])
    folder = web.settings.outbox_dir / f"job-{job_id}"
    (folder / "preview.json").write_text("{not json")
    damaged = viewer.client.get(f"/api/v1/studies/{study}/preview.png")
    assert damaged.status_code == 422 and "cannot be read" in damaged.json()["detail"]
    (folder / "preview.png").unlink()
    missing = viewer.client.get(f"/jobs/{job_id}/preview.png")
    assert missing.status_code == 404 and "missing from the outbox" in missing.text
