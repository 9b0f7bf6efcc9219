"""Preview pictures of jobs and studies: served from the outbox, where the worker drew them.

Why: an operator checking that the node works wants to *see* the results on the
image. The worker draws one picture per job when it encodes the job's results
(:mod:`workers.outputs.preview`: the key slice with the result on it, a legend and
"not for diagnosis"), from the volume and result it has in memory, and names its
files in the job's summary (``summary["preview"]``: ``png`` and ``facts``, relative
to the outbox, or ``error``). This module only finds and reads those files: the web
process decodes no image and reads no series.

A job's preview is shown when its results are (succeeded, released) or awaiting an
operator's review (held, so that the reviewer sees what was held). A study's preview
is one job's: a composite would need one process holding every job's result, which
is what drawing in the worker avoids. Of the study's jobs whose results were sent,
a detection job's picture is preferred (the slice through its largest finding tells
most at a glance), then a segmentation's, then a classification's; the newest job of
the kind wins. Held results are not the study's picture until they are released.

When there is no picture, :class:`PreviewError` says why in words the study page
shows instead of a broken image (job queued or running, failed, not performed,
discarded, drawn by an older node, the worker could not draw it, file missing because
retention removed the study's files or the outbox was lost).
:func:`study_preview_problem` and :func:`job_preview_problem` give that reason to the page
without reading the pictures (they only look whether the files are there).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import job_views, study_views
from dicom_node.db.models import JobState, Study
from dicom_node.settings import Settings

__all__ = ["Preview", "PreviewError", "job_preview", "job_preview_problem", "study_preview", "study_preview_job",
           "study_preview_problem"]

logger = logging.getLogger(__name__)

#: Jobs whose results were sent: their preview may be the study's.
_SENT = (JobState.SUCCEEDED.value, JobState.RELEASED.value)
#: Jobs whose own preview is served (held: for the operator deciding to release or discard).
_SHOWN = (*_SENT, JobState.HELD.value)
#: Which job's preview is the study's: detection first, then segmentation, then classification.
_KIND_ORDER = {"detection": 0, "segmentation": 1, "classification": 2}


class PreviewError(Exception):
    """No preview to show: ``status`` is the HTTP status to answer (404, 422), ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Preview:
    """A job's preview picture and what it shows (from the facts the worker wrote beside it)."""

    png: bytes
    job_id: int
    series_instance_uid: str
    slice_index: int  # 0 = first slice of the volume
    slice_count: int
    overlay: bool  # whether any result is drawn on the slice


def job_preview(settings: Settings, sessions: sessionmaker[Session], job_id: int) -> Preview:
    """The preview of job ``job_id``; raises :class:`PreviewError` saying why there is none."""
    job = job_views.get_job(sessions, job_id)
    if job is None:
        raise PreviewError(404, f"job {job_id} does not exist")
    with sessions() as session:
        purged_at = session.scalar(select(Study.purged_at).where(Study.study_instance_uid == job.study_instance_uid))
    return _read(settings.outbox_dir, job, purged_at)


def study_preview(settings: Settings, sessions: sessionmaker[Session], study_instance_uid: str) -> Preview:
    """The study's preview (see the module docstring for which job's); raises :class:`PreviewError`."""
    detail = study_views.study_detail(sessions, study_instance_uid)
    if detail is None:
        raise PreviewError(404, f"study {study_instance_uid} is not known")
    return _read(settings.outbox_dir, study_preview_job(detail), detail.purged_at)


def study_preview_job(detail: study_views.StudyDetail) -> job_views.JobRow:
    """The job whose preview is the study's; raises :class:`PreviewError` (404) saying why none is.

    Reads no file: the study page uses it to decide between the picture and the reason.
    """
    drawn = [j for j in detail.jobs if j.state in _SENT and "png" in _files(j)]
    if drawn:
        return min(drawn, key=lambda j: (_KIND_ORDER.get(str(j.summary.get("kind")), len(_KIND_ORDER)), -j.id))
    raise PreviewError(404, _no_study_preview(detail))


def study_preview_problem(outbox: Path, detail: study_views.StudyDetail) -> str | None:
    """Why the study page can show no preview picture (the reason it shows instead), None when it can."""
    try:
        job = study_preview_job(detail)
    except PreviewError as exc:
        return exc.message
    return _missing_files(outbox, job, detail.purged_at)


def job_preview_problem(outbox: Path, job: job_views.JobRow, purged_at: datetime | None = None) -> str | None:
    """Why job ``job`` has no picture to link to (its reason), None when its files are in the outbox."""
    if job.state not in _SHOWN or "png" not in _files(job):
        return _no_job_preview(job)
    return _missing_files(outbox, job, purged_at)


def _missing_files(outbox: Path, job: job_views.JobRow, purged_at: datetime | None) -> str | None:
    """Why the preview files that job ``job``'s summary names cannot be served, None when both are there."""
    files = _files(job)
    try:
        present = all(_outbox_file(outbox, job, str(files[name])).is_file() for name in ("png", "facts"))
    except KeyError:
        return _no_job_preview(job)
    except PreviewError as exc:
        return exc.message
    if present:
        return None
    return _missing_message(job, purged_at)


def _missing_message(job: job_views.JobRow, purged_at: datetime | None) -> str:
    name = f"job {job.id} ({job.pipeline})"
    if purged_at is not None:
        return f"{name}: its preview was removed with the study's files by retention on {purged_at:%Y-%m-%d %H:%M} UTC"
    return f"{name}: its preview is missing from the outbox (removed by hand, or the outbox was lost)"


def _files(job: job_views.JobRow) -> dict[str, Any]:
    files = job.summary.get("preview")
    return files if isinstance(files, dict) else {}


def _no_study_preview(detail: study_views.StudyDetail) -> str:
    """Why the study has no preview, in words for the study page."""
    uid = detail.study_instance_uid
    if not detail.jobs:
        if detail.state == "ignored":
            return f"study {uid} has no jobs (no routing rule matched it), so no preview was drawn"
        return f"study {uid} has no jobs yet: a preview is drawn by the worker when a job finishes"
    reasons = [_no_job_preview(job) for job in sorted(detail.jobs, key=lambda j: -j.id)]
    return "no preview yet: " + "; ".join(reasons)


def _no_job_preview(job: job_views.JobRow) -> str:
    """Why job ``job`` shows no preview (its state, its error or reason), or that it has one but is held."""
    name = f"job {job.id} ({job.pipeline})"
    state = job.state
    if state in (JobState.QUEUED.value, JobState.RUNNING.value):
        return f"{name} is {state}; its preview is drawn when it finishes"
    if state in (JobState.FAILED.value, JobState.DEAD.value):
        return f"{name} {state}" + (f": {job.error}" if job.error else "")
    if state == JobState.NOT_APPLICABLE.value:
        return f"{name} was not performed" + (f": {job.outcome_reason}" if job.outcome_reason else "")
    if state == JobState.CANCELLED.value:
        return f"{name} was cancelled"
    if state == JobState.DISCARDED.value:
        return f"{name}: its held results were discarded"
    if state == JobState.HELD.value and "png" in _files(job):
        return f"{name}: results held for review (its own preview: /jobs/{job.id}/preview.png)"
    error = _files(job).get("error")
    if error:
        return f"{name}: {error}"
    return f"{name} has no preview (its worker drew none: it ran before workers drew previews)"


def _read(outbox: Path, job: job_views.JobRow, purged_at: datetime | None = None) -> Preview:
    """The picture and facts job ``job``'s worker wrote to the outbox (``purged_at``: when retention removed
    the study's files, for the reason when they are gone)."""
    if job.state not in _SHOWN:
        raise PreviewError(404, _no_job_preview(job))
    files = _files(job)
    if "png" not in files or "facts" not in files:
        raise PreviewError(404, _no_job_preview(job))
    problem = _missing_files(outbox, job, purged_at)
    if problem is not None:
        logger.warning("preview of job %d: %s", job.id, problem)
        raise PreviewError(404, problem)
    try:
        png = _outbox_file(outbox, job, str(files["png"])).read_bytes()
        facts = json.loads(_outbox_file(outbox, job, str(files["facts"])).read_text(encoding="utf-8"))
        return Preview(png=png, job_id=job.id, series_instance_uid=job.series_instance_uid,
                       slice_index=int(facts["slice_index"]), slice_count=int(facts["slice_count"]),
                       overlay=bool(facts["overlay"]))
    except FileNotFoundError as exc:  # removed between the look and the read
        logger.warning("preview of job %d: %s is missing from the outbox", job.id, exc.filename)
        raise PreviewError(404, _missing_message(job, purged_at)) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("preview of job %d unreadable: %s: %s", job.id, type(exc).__name__, exc)
        raise PreviewError(422, f"job {job.id} ({job.pipeline}): its preview cannot be read: "
                                f"{type(exc).__name__}") from exc


def _outbox_file(outbox: Path, job: job_views.JobRow, relative: str) -> Path:
    path = (outbox / relative).resolve()
    if not path.is_relative_to(outbox.resolve()):
        logger.warning("job %d names a preview file outside the outbox: %r", job.id, relative)
        raise PreviewError(422, f"job {job.id} names a preview file outside the outbox")
    return path
