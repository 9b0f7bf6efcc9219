"""The state a study is *shown* in: one word and a one-line reason summarising its jobs and deliveries.

Why: the stored study state (``receiving``, ``complete``, ``routed``, ``ignored``) says how far
routing went, not whether the results reached the PACS. A study whose every job died is still
``routed``; one whose results sit in the outbox because no destination existed has nothing
failed in it at all. Admins need one honest word per study, the same in the studies list, the
study page, ``dicom-node studies``, ``/api/v1`` and the dashboard's counts, and the stage to look
at. :func:`study_status` computes it from the study's stored state and its *current* jobs (a job
replaced by a re-process, ``superseded_at`` set, is history) with their deliveries; it is a pure
function so that every reader shares it. :mod:`dicom_node.db.study_states` loads its inputs in a
few set-based queries and holds the SQL twin that the list filter and the dashboard count with.

The shown states, first match wins (the precedence, and why):

1. ``receiving``: instances are still arriving (stored ``receiving``). Earlier job outcomes are
   about to be reconsidered (the study is routed again when complete), so they do not decide;
   the reason still names an earlier failure.
2. ``waiting``: complete, not routed yet (stored ``complete``), for the same reason.
3. ``ignored``: no current job and no rule matched (stored ``ignored``), with the router's reason.
   ``waiting`` when routed but no job is recorded.
4. ``failed``: a current job is ``dead`` or ``cancelled``, or a delivery is ``dead``: a person must
   retry, re-send or re-process. Named: ``job 12 lung-nodule-detector dead: <error>``.
5. ``held``: a job's results were judged implausible (``held``: release or discard them), or a job
   produced results that have no delivery at all (``results not sent: no destination``: add a
   destination and re-send). Both need a person but nothing broke, hence after ``failed``.
6. ``in_progress``: something is still moving: a job running or failed and waiting for its retry,
   a delivery pending, sending or failed and waiting for its retry, or a job queued while another
   one of the study already started or finished.
7. ``waiting``: routed, every current job queued, none started.
8. ``done``: every current job finished (succeeded, released, not applicable - the model declined
   the series, a normal outcome noted in the reason - or discarded) and every delivery delivered.

So a problem that needs a person (failed, then held) outranks work still in flight: the badge
does not turn green or "in progress" while something is already known to need someone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicom_node.db.models import DeliveryState, JobState, StudyState

__all__ = ["NO_DESTINATION", "SHOWN_STATES", "STATE_LABELS", "DeliveryFacts", "JobFacts", "StudyStatus", "one_line", "study_status"]

#: The shown states, in the order lists and the dashboard show them.
SHOWN_STATES = ("receiving", "waiting", "in_progress", "done", "held", "failed", "ignored")
#: Words for people.
STATE_LABELS = {"receiving": "receiving", "waiting": "waiting", "in_progress": "in progress", "done": "done",
                "held": "held", "failed": "failed", "ignored": "ignored"}
#: The reason's words for results that have no delivery at all (no destination existed when the job finished).
NO_DESTINATION = "results not sent: no destination"
#: How long an error or reason may be inside a one-line reason (the page shows the whole error beside the job).
_MAX_DETAIL = 200

_J, _D = JobState, DeliveryState
_FAILED_JOB = (_J.DEAD.value, _J.CANCELLED.value)
_RESULTS_SENT = (_J.SUCCEEDED.value, _J.RELEASED.value)
_MOVING_JOB = (_J.RUNNING.value, _J.FAILED.value)
_MOVING_DELIVERY = (_D.PENDING.value, _D.SENDING.value, _D.FAILED.value)


@dataclass(frozen=True)
class JobFacts:
    """What the state needs of one current job. ``results``: its result objects other than the
    "AI analysis not performed" notice; ``note``: why it was not applicable or was held (its checks)."""

    id: int
    pipeline: str
    state: str
    error: str | None = None
    attempts: int = 0
    max_attempts: int = 0
    results: int = 0
    note: str | None = None


@dataclass(frozen=True)
class DeliveryFacts:
    """What the state needs of one delivery of a current job."""

    id: int
    job_id: int
    destination: str
    state: str
    error: str | None = None
    attempts: int = 0
    max_attempts: int = 0


@dataclass(frozen=True)
class StudyStatus:
    """A study's shown state (one of :data:`SHOWN_STATES`), the reason naming the stage, and the
    counts of its current jobs and their deliveries by state."""

    state: str
    reason: str
    job_counts: dict[str, int] = field(default_factory=dict)
    delivery_counts: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return STATE_LABELS[self.state]

    @property
    def needs_person(self) -> bool:
        return self.state in ("failed", "held")


def one_line(text: str | None, limit: int = _MAX_DETAIL) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters with an ellipsis."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[:limit - 1].rstrip() + "…"


def _with(text: str, detail: str | None) -> str:
    return f"{text}: {one_line(detail)}" if detail and detail.strip() else text


def _job(job: JobFacts) -> str:
    return f"job {job.id} {job.pipeline}"


def _delivery(delivery: DeliveryFacts) -> str:
    return f"delivery {delivery.id} to {delivery.destination}"


def _first(problems: list[str]) -> str:
    """The first problem, and how many more there are."""
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more)" if more > 0 else "")


def _failures(jobs: Sequence[JobFacts], deliveries: Sequence[DeliveryFacts]) -> list[str]:
    found = [_with(f"{_job(j)} {j.state}", j.error) for j in jobs if j.state in _FAILED_JOB]
    found += [_with(f"{_delivery(d)} dead", d.error) for d in deliveries if d.state == _D.DEAD.value]
    return found


def _holds(jobs: Sequence[JobFacts], delivered_jobs: set[int]) -> list[str]:
    found = [_with(f"{_job(j)} results held as implausible (release or discard)", j.note)
             for j in jobs if j.state == _J.HELD.value]
    found += [f"{NO_DESTINATION} ({_job(j)}, {j.results} object(s))"
              for j in jobs if j.state in _RESULTS_SENT and j.results and j.id not in delivered_jobs]
    return found


def _movements(jobs: Sequence[JobFacts], deliveries: Sequence[DeliveryFacts]) -> list[str]:
    """What is still moving, the most telling first: retries with their errors, then work under way."""
    found = [_with(f"{_job(j)} failed, will retry (attempt {j.attempts} of {j.max_attempts})", j.error)
             for j in jobs if j.state == _J.FAILED.value]
    for d in deliveries:
        if d.state == _D.FAILED.value:
            if d.attempts == 0:  # re-sent by an operator, due at the node's next sweep
                found.append(f"{_delivery(d)} due now")
            else:
                found.append(_with(f"{_delivery(d)} failed, will retry (attempt {d.attempts} of {d.max_attempts})",
                                   d.error))
    found += [f"{_job(j)} running" for j in jobs if j.state == _J.RUNNING.value]
    found += [f"{_delivery(d)} {d.state}" for d in deliveries if d.state in (_D.SENDING.value, _D.PENDING.value)]
    found += [f"{_job(j)} queued" for j in jobs if j.state == _J.QUEUED.value]
    return found


def _done_reason(jobs: Sequence[JobFacts], deliveries: Sequence[DeliveryFacts]) -> str:
    declined = [j for j in jobs if j.state == _J.NOT_APPLICABLE.value]
    discarded = [j for j in jobs if j.state == _J.DISCARDED.value]
    if len(declined) == len(jobs):
        return "not applicable: " + "; ".join(_with(_job(j), j.note) for j in declined)
    sent = f"{len(deliveries)} delivery(ies) delivered" if deliveries else "nothing to send"
    notes = [_with(f"{_job(j)} not applicable", j.note) for j in declined]
    notes += [f"{_job(j)} held results discarded" for j in discarded]
    return "; ".join([f"{len(jobs)} job(s) finished, {sent}", *notes])


def study_status(stored_state: str, jobs: Sequence[JobFacts], deliveries: Sequence[DeliveryFacts],
                 *, ignored_reason: str | None = None) -> StudyStatus:
    """The shown state of a study (module docstring: states and precedence) from its stored state, its
    current jobs (superseded ones left out by the caller) and their deliveries."""
    job_ids = {j.id for j in jobs}
    stray = [d.id for d in deliveries if d.job_id not in job_ids]
    if stray:
        raise ValueError(f"deliveries {stray} belong to no current job of the study (jobs {sorted(job_ids)})")
    counts = dict(Counter(j.state for j in jobs)), dict(Counter(d.state for d in deliveries))

    def shown(state: str, reason: str) -> StudyStatus:
        return StudyStatus(state, reason, *counts)

    failures = _failures(jobs, deliveries)
    if stored_state == StudyState.RECEIVING.value:
        return shown("receiving", "receiving instances" + (f" (earlier: {_first(failures)})" if failures else ""))
    if stored_state == StudyState.COMPLETE.value:
        return shown("waiting", "complete, waiting to be routed")
    if not jobs:
        if stored_state == StudyState.IGNORED.value:
            return shown("ignored", _with("no routing rule matched", ignored_reason))
        return shown("waiting", "routed, no job recorded yet")
    if failures:
        return shown("failed", _first(failures))
    holds = _holds(jobs, {d.job_id for d in deliveries})
    if holds:
        return shown("held", _first(holds))
    started = any(j.state != _J.QUEUED.value for j in jobs)
    moving = (any(j.state in _MOVING_JOB for j in jobs) or any(d.state in _MOVING_DELIVERY for d in deliveries)
              or (started and any(j.state == _J.QUEUED.value for j in jobs)))
    if moving:
        finished = sum(1 for j in jobs if j.state not in (_J.QUEUED.value, *_MOVING_JOB))
        return shown("in_progress", f"{_movements(jobs, deliveries)[0]}; {finished} of {len(jobs)} job(s) finished")
    if not started:
        return shown("waiting", f"routed, {len(jobs)} job(s) queued, none started")
    return shown("done", _done_reason(jobs, deliveries))
