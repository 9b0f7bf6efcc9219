"""The JSON the studies and jobs API answers with (``/api/v1/studies``, ``/api/v1/jobs``, ``/api/v1/deliveries``,
the actions).

Why a module of its own: these models are the API's published contract (OpenAPI schema,
field descriptions); they change when the API changes, not when a page does. They are
filled from the read-only views (:mod:`dicom_node.db.study_views`,
:mod:`dicom_node.db.job_views`, :mod:`dicom_node.db.study_timeline`) by attribute.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ActionOut", "AssociationOut", "DeliveryList", "DeliveryOut", "EventOut", "FindingOut", "JobList", "JobOut", "ResultOut",
           "SeriesOut", "StageOut", "StatusOut", "StudyItem", "StudyList", "StudyOut", "TimelineOut"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class StatusOut(_Out):
    """The state a study is shown in: what became of its current jobs and their deliveries."""

    state: Literal["receiving", "waiting", "in_progress", "done", "held", "failed", "ignored"] = Field(
        description="receiving: instances arriving; waiting: not routed yet, or every job queued; in_progress: a job "
                    "or delivery under way or waiting for its retry; done: every job finished (a model that declined "
                    "the series counts) and every delivery delivered; held: results judged implausible, or results "
                    "with no destination to go to (needs a person); failed: a job dead or cancelled, or a delivery "
                    "dead (needs a person); ignored: no routing rule matched. First match in the order failed, held, "
                    "in_progress, waiting, done, after receiving and waiting-to-be-routed")
    label: str = Field(description="The state in words (\"in progress\")")
    reason: str = Field(description="One line naming the stage, e.g. \"job 12 lung-nodule-detector dead: ...\", "
                                    "\"delivery 7 to PACS dead: ...\", \"results not sent: no destination (...)\"")


class StudyItem(_Out):
    """One study of the list, with what became of its jobs and deliveries (counts by state)."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None = Field(description="YYYYMMDD, as in the DICOM header")
    study_description: str | None
    state: str = Field(description="The stored state: receiving, complete, routed or ignored (routing's progress; "
                                   "see status for what became of the jobs and deliveries)")
    status: StatusOut
    modalities: list[str]
    source_ae_titles: list[str] = Field(description="Calling AE titles of the DICOM associations that sent it")
    sources: list[str] = Field(description="Who sent it: calling AE titles, and \"STOW-RS by <user>\" for each "
                                           "account that pushed instances by STOW-RS")
    series_count: int
    instance_count: int
    job_counts: dict[str, int] = Field(description="Current jobs (not replaced by a re-process) by state, e.g. "
                                                   "{\"succeeded\": 2, \"held\": 1}")
    delivery_counts: dict[str, int] = Field(description="Deliveries of the current jobs by state")
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


class _Page(_Out):
    """What every list (studies, jobs, deliveries) says about its page: keyset cursors and a capped count."""

    total: int = Field(description="Items matching the filters, all pages; when total_exact is false, at least "
                                   "this many (counting stops at the cap unless count=exact)")
    limit: int
    offset: int = Field(description="The offset asked for; 0 for a page found by cursor")
    total_exact: bool = Field(True, description="false: total is the cap and more items match")
    next_cursor: str | None = Field(None, description="after=this gives the next (older) page; null on the last page")
    previous_cursor: str | None = Field(None, description="before=this gives the previous (newer) page; null on the "
                                                          "first")


class StudyList(_Page):
    items: list[StudyItem]


class SeriesOut(_Out):
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    body_part_examined: str | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    is_result: bool = Field(description="A series of results this node produced, sent back to it")


class AssociationOut(_Out):
    """A DICOM association, or a STOW-RS request (protocol stow-rs, no AE title, the account in username)."""

    id: int
    protocol: str = Field(description="dicom or stow-rs")
    username: str | None = Field(description="The account that sent a STOW-RS request")
    calling_ae_title: str
    peer_address: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    instances_stored: int


class EventOut(_Out):
    at: datetime
    kind: str
    detail: str | None


class ResultOut(_Out):
    id: int
    job_id: int
    kind: str = Field(description="SEG, SR or GSPS")
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    created_at: datetime


class DeliveryOut(_Out):
    id: int
    job_id: int
    study_instance_uid: str
    destination: str
    state: str = Field(description="pending, sending, delivered, failed (awaiting its next attempt) or dead")
    attempts: int
    max_attempts: int
    error: str | None
    objects_sent: int
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    state_changed_at: datetime
    kinds: list[str] | None = Field(None, description="The result kinds it carries: [\"NOTICE\"] for the "
                                    "'AI analysis not performed' SR alone; null: the job's results")


class JobOut(_Out):
    id: int
    study_instance_uid: str
    series_instance_uid: str
    pipeline: str
    rule: str
    state: str = Field(description="queued, running, succeeded, failed (to be retried), dead, cancelled, "
                                   "not_applicable (the series is outside what the model was made for), held "
                                   "(results judged implausible: kept, not sent), released (held results an "
                                   "operator sent) or discarded (held results an operator threw away)")
    attempts: int
    max_attempts: int
    error: str | None
    worker: str | None
    stage_seconds: dict[str, float] = Field(description="Seconds per stage of the last attempt "
                                                        "(load, model_load, inference, encoding, outbox)")
    summary: dict[str, Any] = Field(description="The findings: volumes_ml per segment, or detections")
    checks: dict[str, Any] = Field(description="The worker's checks: applicability (before the model: applies, "
                                   "reason_code, reason, header_regions, image_regions, checks [{name, passed, "
                                   "detail}], seconds) and plausibility (after it: plausible, reasons, checks, "
                                   "seconds); {} before the job ran")
    outcome_reason: str | None = Field(description="not_applicable: why the model did not apply; held, released "
                                       "or discarded: what the result broke; null otherwise")
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    state_changed_at: datetime
    results: list[ResultOut]
    deliveries: list[DeliveryOut]
    generation: int = Field(1, description="1 for the job routing made; 2, 3, ... for re-runs of the model on the "
                                           "series (re-process, or the node's own after the series grew)")
    supersedes_job_id: int | None = Field(None, description="The earlier job whose results this one replaces")
    superseded_at: datetime | None = Field(None, description="When a later run's results replaced this job's: "
                                                             "history, no longer counted in the study's state")


class JobList(_Page):
    items: list[JobOut]


class DeliveryList(_Page):
    items: list[DeliveryOut]


class StageOut(BaseModel):
    stage: str
    seconds: float


class TimelineOut(_Out):
    at: datetime
    kind: str = Field(description="received, study.<event>, job.<state>, delivery.<state>")
    title: str
    state: str | None
    duration_seconds: float | None
    duration_label: str
    detail: str | None
    stages: list[StageOut]
    job_id: int | None
    delivery_id: int | None

    @field_validator("stages", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        return [{"stage": v[0], "seconds": v[1]} if isinstance(v, (tuple, list)) else v for v in value]


class FindingOut(_Out):
    job_id: int
    pipeline: str
    kind: str = Field(description="segment or detection")
    label: str
    volume_ml: float | None
    diameter_mm: float | None
    score: float | None
    centre_mm: list[float] | None


class StudyOut(_Out):
    """A study with everything known about it."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    state: str = Field(description="The stored state: receiving, complete, routed or ignored")
    status: StatusOut
    instance_count: int
    late_instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    state_changed_at: datetime
    modalities: list[str]
    source_ae_titles: list[str]
    sources: list[str]
    series: list[SeriesOut]
    associations: list[AssociationOut]
    events: list[EventOut]
    jobs: list[JobOut]
    timeline: list[TimelineOut]
    findings: list[FindingOut]
    preview_url: str


class ActionOut(BaseModel):
    """What a retry, cancel, re-send, release or discard did."""

    kind: Literal["job", "delivery"]
    id: int
    action: str
    before: str = Field(description="State before")
    after: str = Field(description="State after")
    message: str
