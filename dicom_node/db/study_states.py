"""Studies' shown states from the database: the inputs of :func:`dicom_node.study_status.study_status`
read for many studies at once, and the same decision as one SQL expression.

Why both: pages, the CLI and the API show each study's state with its reason, which needs
the jobs' errors and the deliveries' destinations (:func:`study_statuses`, two or three
queries for any number of studies, never one per study). The studies list's filter and the dashboard's
counts must select and count *every* study in a state, not one page of them, so they use
:func:`state_condition` and :func:`shown_state_sql`, built from one list of rules (correlated
``EXISTS``, study -> its jobs -> their deliveries, by the foreign-key indexes) that follows the
same precedence. A test compares them with the reasoned state on studies in every state
(tests/web/test_study_states.py); change both together. Measured on SQLite with 100,000 studies
(2 jobs each): the list filtered to one state 0.7 s, the dashboard's counts over all of them 1.3 s.

Only *current* jobs count: a job whose ``superseded_at`` is set was replaced by a re-process.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, literal_column, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from dicom_node.db.job_checks import outcome_reason
from dicom_node.db.jobs import NOTICE_KIND
from dicom_node.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    ResultObject,
    Study,
    StudyEvent,
    StudyState,
    json_object,
)
from dicom_node.study_status import SHOWN_STATES, DeliveryFacts, JobFacts, StudyStatus, study_status

__all__ = ["shown_state_sql", "state_condition", "study_statuses", "study_statuses_by_uid"]

logger = logging.getLogger(__name__)

_J, _D = JobState, DeliveryState


def _state(column: Any) -> ColumnElement[str]:
    """A state column as a value that no index serves. The lookups here go study -> its jobs -> their
    deliveries by the foreign-key indexes; without statistics SQLite's planner would rather take the
    index on ``state`` for ``state = 'dead'`` and scan every dead delivery once per study (measured:
    116 s instead of well under a second for the list filter over 20,000 studies)."""
    return func.coalesce(column, "")


def _exists(*where: Any) -> ColumnElement[bool]:
    """``EXISTS (SELECT 1 ... WHERE where OFFSET 0)``: a correlated lookup that PostgreSQL runs per row, by index.

    Why the ``OFFSET 0``: without it PostgreSQL may turn a correlated ``EXISTS`` into a hashed subplan, which
    reads every row of the table (every job of the database) once per query to hash the matching ones; it
    chooses that when it expects many outer rows (the dashboard's 5,000 studies) and the hash looks cheap,
    and so the dashboard's counts grew with the history (1 s at 100,000 studies, 2.4 s at 1,000,000). An
    ``OFFSET`` keeps the subquery as it is written (SQLite gets ``LIMIT -1 OFFSET 0``: the same lookup)."""
    return select(literal_column("1")).where(*where).offset(literal_column("0")).exists()


def _current_job(*where: Any) -> ColumnElement[bool]:
    """A current job of the study in the enclosing query matches ``where``."""
    return _exists(Job.study_id == Study.id, Job.superseded_at.is_(None), *where)


def _delivery_of_current_job(states: Sequence[str]) -> ColumnElement[bool]:
    """A delivery of a current job is in one of ``states``. Nested (study -> its jobs -> their deliveries) so that
    the database looks deliveries up by job, not every delivery in that state for every study."""
    return _current_job(_exists(Delivery.job_id == Job.id, _state(Delivery.state).in_(states)))


def _results_without_delivery() -> ColumnElement[bool]:
    """A current job whose results were to be sent (succeeded, released) has some but no delivery at all."""
    result, delivery = aliased(ResultObject), aliased(Delivery)
    return _current_job(
        _state(Job.state).in_((_J.SUCCEEDED.value, _J.RELEASED.value)),
        _exists(result.job_id == Job.id, result.kind != NOTICE_KIND),
        ~_exists(delivery.job_id == Job.id),
    )


@functools.lru_cache(maxsize=1)
def _rules() -> tuple[tuple[ColumnElement[bool], str], ...]:
    """(condition, shown state) in the order of precedence of :mod:`dicom_node.study_status`; a study matching
    none is done. The one source of :func:`shown_state_sql` and :func:`state_condition`.

    Built once: SQL expressions are immutable, and building these took about 15 ms per dashboard refresh."""
    any_job = _current_job()
    started = _current_job(_state(Job.state) != _J.QUEUED.value)
    return (
        (Study.state == StudyState.RECEIVING.value, "receiving"),
        (Study.state == StudyState.COMPLETE.value, "waiting"),
        (and_(Study.state == StudyState.IGNORED.value, ~any_job), "ignored"),
        (~any_job, "waiting"),
        (_current_job(_state(Job.state).in_((_J.DEAD.value, _J.CANCELLED.value)))
         | _delivery_of_current_job((_D.DEAD.value,)), "failed"),
        (_current_job(_state(Job.state) == _J.HELD.value) | _results_without_delivery(), "held"),
        (_current_job(_state(Job.state).in_((_J.RUNNING.value, _J.FAILED.value)))
         | _delivery_of_current_job((_D.PENDING.value, _D.SENDING.value, _D.FAILED.value))
         | and_(started, _current_job(_state(Job.state) == _J.QUEUED.value)), "in_progress"),
        (~started, "waiting"),
    )


@functools.lru_cache(maxsize=1)
def shown_state_sql() -> ColumnElement[str]:
    """The shown state of the study of the enclosing ``select(... Study ...)``, as SQL (the precedence
    of :mod:`dicom_node.study_status`; :func:`study_statuses` gives the same word with its reason)."""
    return case(*((condition, literal(state)) for condition, state in _rules()), else_=literal("done"))


def state_condition(state: str) -> ColumnElement[bool]:
    """Studies shown in ``state`` (one of :data:`dicom_node.study_status.SHOWN_STATES`): the same rules as
    :func:`shown_state_sql`, each state's own condition first, so that a study that does not match it
    is left after a lookup or two instead of the whole ``CASE`` (about 2x faster on a list of every study)."""
    if state not in SHOWN_STATES:
        raise ValueError(f"study state {state!r} is not one of {', '.join(SHOWN_STATES)}")
    rules = _rules()
    if state == "done":
        return and_(*(~condition for condition, _ in rules))
    return or_(*(and_(condition, *(~earlier for earlier, _ in rules[:n]))
                 for n, (condition, shown) in enumerate(rules) if shown == state))


def study_statuses(session: Session, stored: Mapping[int, str]) -> dict[int, StudyStatus]:
    """``{study id: StudyStatus}`` of the studies ``stored`` names (``{study id: stored state}``, which the
    caller has read anyway): two queries, three when one of them is ignored (its router's reason)."""
    ids = sorted(stored)
    if not ids:
        return {}
    current = and_(Job.study_id.in_(ids), Job.superseded_at.is_(None))
    results = (select(func.count()).where(ResultObject.job_id == Job.id, ResultObject.kind != NOTICE_KIND)
               .correlate(Job).scalar_subquery())
    rows = session.execute(
        select(Job.id, Job.study_id, Job.pipeline, Job.state, Job.error, Job.attempts, Job.max_attempts, Job.checks,
               results).where(current).order_by(Job.id)
    ).all()
    jobs: dict[int, list[JobFacts]] = defaultdict(list)
    for job_id, study_id, pipeline, state, error, attempts, max_attempts, checks, result_count in rows:
        note = None
        if state in (_J.NOT_APPLICABLE.value, _J.HELD.value) and checks:
            note = outcome_reason(state, json_object(checks, f"checks of job {job_id}"))
        jobs[int(study_id)].append(JobFacts(
            id=int(job_id), pipeline=str(pipeline), state=str(state), error=error, attempts=int(attempts),
            max_attempts=int(max_attempts), results=int(result_count or 0), note=note))
    deliveries: dict[int, list[DeliveryFacts]] = defaultdict(list)
    for delivery_id, job_id, study_id, destination, state, error, attempts, max_attempts in session.execute(
        select(Delivery.id, Delivery.job_id, Job.study_id, Delivery.destination, Delivery.state, Delivery.error,
               Delivery.attempts, Delivery.max_attempts).join(Job, Job.id == Delivery.job_id)
        .where(current).order_by(Delivery.id)
    ):
        deliveries[int(study_id)].append(DeliveryFacts(
            id=int(delivery_id), job_id=int(job_id), destination=str(destination), state=str(state), error=error,
            attempts=int(attempts), max_attempts=int(max_attempts)))
    ignored = [i for i, s in stored.items() if s == StudyState.IGNORED.value and not jobs.get(i)]
    reasons: dict[int, str | None] = {}
    if ignored:
        for study_id, detail in session.execute(
            select(StudyEvent.study_id, StudyEvent.detail)
            .where(StudyEvent.study_id.in_(ignored), StudyEvent.kind == "ignored").order_by(StudyEvent.id)
        ):
            reasons[int(study_id)] = detail  # the last one wins
    return {i: study_status(state, jobs.get(i, []), deliveries.get(i, []), ignored_reason=reasons.get(i))
            for i, state in stored.items()}


def study_statuses_by_uid(sessions: sessionmaker[Session], study_uids: Sequence[str]) -> dict[str, StudyStatus]:
    """``{Study Instance UID: StudyStatus}`` of the given studies (unknown UIDs left out)."""
    if not study_uids:
        return {}
    with sessions() as session:
        rows = session.execute(select(Study.id, Study.study_instance_uid, Study.state)
                               .where(Study.study_instance_uid.in_(list(study_uids)))).all()
        statuses = study_statuses(session, {int(i): str(state) for i, _, state in rows})
    return {str(uid): statuses[int(i)] for i, uid, _ in rows}
