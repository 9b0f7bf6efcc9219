"""Deliveries: send one job's result objects to one destination, with retries and a dead letter.

Why: delivery is separate from inference (queue ``io``) so a destination that is
down for minutes costs only retries, never a re-run of the model: the objects wait
in the outbox, the delivery row carries attempts, the last error and when to try
next (exponential backoff), and after ``max_attempts`` it is ``dead`` until an admin
retries it. Each destination receives only the kinds of objects it asked for, a job's
low-confidence variants (``GSPS+LOW``) as its ``outline_low_confidence`` says now
(:mod:`dicom_node.result_variants`).

Notification destinations (HL7, FHIR) get the job's news rather than its objects
(:mod:`dicom_node.notify`): a result delivery that completes the job's last one makes its
notifications due (:mod:`dicom_node.db.notifications`), which the next sweep sends here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import config_repo, jobs
from dicom_node.delivery_types import DeliveryError, SendReport
from dicom_node.db.notifications import notification_facts
from dicom_node.destinations import (
    DicomDestination,
    DicomWebDestination,
    FhirDestination,
    HL7Destination,
    NotificationDestination,
)
from dicom_node.result_variants import select_results
from dicom_node.settings import DeliverySettings
from dicom_node.work_in_flight import WorkInFlight

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)


@dataclass
class Dispatcher:
    """Sends deliveries by id; everything it needs is read from the database and the outbox."""

    sessions: sessionmaker[Session]
    outbox_dir: Path
    calling_ae_title: str
    policy: DeliverySettings
    clock: Callable[[], datetime]
    #: The deliveries this process sends now (shared with its pipeline), so that a stop hands them back.
    work: WorkInFlight = field(default_factory=WorkInFlight)

    def deliver(self, delivery_id: int) -> str | None:
        """Send delivery ``delivery_id`` if it is pending; returns its new state (None if not ours).

        Raises :class:`~dicom_node.work_in_flight.StopRequested` when this process is
        stopping: the delivery stays pending (the task sends its id back to the queue).
        """
        claim = self.work.claim("delivery", delivery_id, lambda: jobs.claim_delivery(
            self.sessions, delivery_id, now=self.clock(), lease_seconds=self.policy.lease_seconds),
            lambda claimed: claimed.attempt)
        if claim is None:
            return None
        try:
            return self._send_claimed(claim)
        finally:
            self.work.release("delivery", delivery_id)

    def _send_claimed(self, claim: jobs.DeliveryClaim) -> str | None:
        delivery_id = claim.delivery_id
        destination = config_repo.get_destination(self.sessions, claim.destination)
        if destination is None:
            return self._fail(claim.delivery_id, f"destination {claim.destination!r} no longer exists",
                              retryable=False)
        if isinstance(destination, (HL7Destination, FhirDestination)):
            return self._notify(claim, destination)
        kinds = set(destination.outputs) if claim.kinds is None else set(claim.kinds)
        kinds &= set(destination.outputs) | {jobs.NOTICE_KIND}
        wanted = select_results(jobs.results_of_job(self.sessions, claim.job_id), kinds,
                                destination.outline_low_confidence)
        if not wanted:
            self._delivered(delivery_id, 0)
            logger.info("delivery %d to %s: nothing of kinds %s to send", delivery_id, destination.name,
                        sorted(kinds))
            return "delivered"
        files = [self.outbox_dir / r.path for r in wanted]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            return self._fail(delivery_id, f"result file(s) missing from the outbox: {', '.join(missing)}",
                              retryable=False)
        try:
            report = self._send(destination, files)
        except DeliveryError as exc:
            return self._fail(delivery_id, str(exc), retryable=exc.retryable)
        except Exception as exc:  # a sender bug must not kill the io worker; keep it visible and retry
            logger.exception("delivery %d to %s failed unexpectedly", delivery_id, destination.name)
            return self._fail(delivery_id, f"{type(exc).__name__}: {exc}", retryable=True)
        if not report.ok:
            return self._fail(delivery_id, report.summary(), retryable=report.retryable)
        self._delivered(delivery_id, len(report.stored))
        logger.info("delivery %d: %d object(s) stored at %s in %.2f s", delivery_id, len(report.stored),
                    destination.name, report.elapsed_seconds)
        return "delivered"

    def _delivered(self, delivery_id: int, objects_sent: int) -> None:
        """Record a result delivery as delivered; the job's notifications become due if it was its last one."""
        due = jobs.finish_delivery(self.sessions, delivery_id, now=self.clock(), objects_sent=objects_sent,
                                   notify_max_attempts=self.policy.max_attempts)
        if due:
            logger.info("delivery %d was the job's last: notification(s) %s due", delivery_id, due)

    def _notify(self, claim: jobs.DeliveryClaim, destination: NotificationDestination) -> str:
        """Send the notification of delivery ``claim`` (HL7 or FHIR; :mod:`dicom_node.notify`)."""
        from dicom_node.notify import send_notification

        facts = notification_facts(self.sessions, claim.delivery_id)
        if facts is None:
            return self._fail(claim.delivery_id, f"job {claim.job_id} is in no state a notification reports "
                                                 "(cancelled, discarded or failed since)", retryable=False)
        try:
            notified = send_notification(destination, facts, now=self.clock())
        except DeliveryError as exc:
            return self._fail(claim.delivery_id, str(exc), retryable=exc.retryable)
        except Exception as exc:  # a builder bug must not kill the io worker; keep it visible and retry
            logger.exception("notification %d to %s failed unexpectedly", claim.delivery_id, destination.name)
            return self._fail(claim.delivery_id, f"{type(exc).__name__}: {exc}", retryable=True)
        jobs.finish_delivery(self.sessions, claim.delivery_id, now=self.clock(), objects_sent=notified.sent)
        logger.info("delivery %d: job %d %s notified to %s in %.2f s: %s", claim.delivery_id, claim.job_id,
                    facts.event.replace("_", " "), destination.name, notified.seconds, notified.detail)
        return "delivered"

    def _send(self, destination: DicomDestination | DicomWebDestination, files: list[Path]) -> SendReport:
        if isinstance(destination, DicomDestination):
            from dicom_node.scu import send_dicom

            return send_dicom(destination, files, calling_ae_title=self.calling_ae_title)
        from dicom_node.stow import send_dicomweb

        return send_dicomweb(destination, files)

    def _fail(self, delivery_id: int, error: str, *, retryable: bool) -> str:
        state, next_at = jobs.fail_delivery(
            self.sessions, delivery_id, now=self.clock(), error=error, retryable=retryable,
            backoff_initial_seconds=self.policy.backoff_initial_seconds,
            backoff_max_seconds=self.policy.backoff_max_seconds,
        )
        logger.warning("delivery %d %s%s: %s", delivery_id, state,
                       f" (next attempt {next_at:%H:%M:%S})" if next_at else "", error)
        return state
