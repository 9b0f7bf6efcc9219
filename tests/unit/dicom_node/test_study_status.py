"""The shown state of a study (dicom_node.study_status): every state, its reason, and the precedence."""

from __future__ import annotations

import pytest

from dicom_node.study_status import SHOWN_STATES, DeliveryFacts, JobFacts, one_line, study_status


def job(id: int, state: str, *, pipeline: str = "chest-seg", error: str | None = None, results: int = 2,
        note: str | None = None, attempts: int = 1, max_attempts: int = 3) -> JobFacts:
    return JobFacts(id=id, pipeline=pipeline, state=state, error=error, attempts=attempts, max_attempts=max_attempts,
                    results=results, note=note)


def delivery(id: int, job_id: int, state: str, *, error: str | None = None, attempts: int = 1,
             destination: str = "PACS") -> DeliveryFacts:
    return DeliveryFacts(id=id, job_id=job_id, destination=destination, state=state, error=error, attempts=attempts,
                         max_attempts=5)


def test_stored_states_before_routing() -> None:
    assert study_status("receiving", [], []).state == "receiving"
    waiting = study_status("complete", [], [])
    assert (waiting.state, waiting.reason) == ("waiting", "complete, waiting to be routed")
    ignored = study_status("ignored", [], [], ignored_reason="rule ct: modality MR is not CT")
    assert (ignored.state, ignored.reason) == ("ignored", "no routing rule matched: rule ct: modality MR is not CT")
    assert study_status("ignored", [], []).reason == "no routing rule matched"
    assert study_status("routed", [], []).state == "waiting"


def test_a_dead_job_is_failed_and_named_with_its_error() -> None:
    status = study_status("routed", [job(12, "dead", pipeline="lung-nodule-detector", error="VolumeError:\n  gap"),
                                     job(13, "succeeded")], [delivery(1, 13, "delivered")])
    assert status.state == "failed"
    assert status.reason == "job 12 lung-nodule-detector dead: VolumeError: gap"
    assert status.job_counts == {"dead": 1, "succeeded": 1} and status.delivery_counts == {"delivered": 1}
    assert status.needs_person and status.label == "failed"


def test_a_dead_delivery_and_a_cancelled_job_are_failed() -> None:
    status = study_status("routed", [job(3, "succeeded")],
                          [delivery(7, 3, "dead", error="C-STORE to PACS: association rejected"),
                           delivery(8, 3, "delivered", destination="ARCHIVE")])
    assert (status.state, status.reason) == ("failed", "delivery 7 to PACS dead: C-STORE to PACS: association rejected")
    cancelled = study_status("routed", [job(4, "cancelled"), job(5, "dead", error="x")], [])
    assert cancelled.reason == "job 4 chest-seg cancelled (and 1 more)"


def test_held_results_and_results_without_any_delivery_are_held() -> None:
    held = study_status("routed", [job(5, "held", note="lung volume 9000 ml is above 8000 ml")], [])
    assert held.state == "held"
    assert held.reason == "job 5 chest-seg results held as implausible (release or discard): " \
                          "lung volume 9000 ml is above 8000 ml"
    nowhere = study_status("routed", [job(6, "succeeded", results=3)], [])
    assert (nowhere.state, nowhere.reason) == ("held", "results not sent: no destination (job 6 chest-seg, 3 object(s))")
    released_nowhere = study_status("routed", [job(6, "released", results=1)], [])
    assert released_nowhere.state == "held"


def test_a_job_without_results_needs_no_delivery() -> None:
    # a succeeded job that produced no object (nothing to send), and a model that declined with only its notice
    status = study_status("routed", [job(1, "succeeded", results=0), job(2, "not_applicable", results=0,
                                                                         note="not a chest")], [])
    assert status.state == "done"
    assert status.reason == "2 job(s) finished, nothing to send; job 2 chest-seg not applicable: not a chest"


def test_in_progress_names_retries_first_then_work_under_way() -> None:
    retrying = study_status("routed", [job(1, "succeeded"), job(2, "running")],
                            [delivery(7, 1, "failed", error="timed out", attempts=2)])
    assert retrying.state == "in_progress"
    assert retrying.reason == "delivery 7 to PACS failed, will retry (attempt 2 of 5): timed out; 1 of 2 job(s) finished"
    job_retry = study_status("routed", [job(1, "failed", error="CUDA out of memory", attempts=1)], [])
    assert (job_retry.state, job_retry.reason) == (
        "in_progress", "job 1 chest-seg failed, will retry (attempt 1 of 3): CUDA out of memory; 0 of 1 job(s) finished")
    resent = study_status("routed", [job(1, "succeeded")], [delivery(7, 1, "failed", attempts=0)])
    assert resent.reason.startswith("delivery 7 to PACS due now")
    sending = study_status("routed", [job(1, "succeeded")], [delivery(7, 1, "sending")])
    assert sending.reason.startswith("delivery 7 to PACS sending")


def test_queued_is_waiting_alone_and_in_progress_behind_finished_work() -> None:
    alone = study_status("routed", [job(1, "queued", attempts=0), job(2, "queued", attempts=0)], [])
    assert (alone.state, alone.reason) == ("waiting", "routed, 2 job(s) queued, none started")
    behind = study_status("routed", [job(1, "not_applicable", results=0), job(2, "queued")], [])
    assert (behind.state, behind.reason) == ("in_progress", "job 2 chest-seg queued; 1 of 2 job(s) finished")


def test_done_needs_every_job_finished_and_every_delivery_delivered() -> None:
    done = study_status("routed", [job(1, "succeeded"), job(2, "discarded")], [delivery(3, 1, "delivered")])
    assert (done.state, done.reason) == (
        "done", "2 job(s) finished, 1 delivery(ies) delivered; job 2 chest-seg held results discarded")
    declined = study_status("routed", [job(1, "not_applicable", results=1, note="head CT")],
                            [delivery(2, 1, "delivered")])
    assert (declined.state, declined.reason) == ("done", "not applicable: job 1 chest-seg: head CT")


@pytest.mark.parametrize(("jobs", "deliveries", "expected"), [
    # failed > held > in progress > waiting > done
    ([job(1, "dead"), job(2, "held")], [], "failed"),
    ([job(1, "succeeded")], [delivery(1, 1, "dead"), ], "failed"),
    ([job(1, "held"), job(2, "running")], [], "held"),
    ([job(1, "succeeded", results=1), job(2, "running")], [], "held"),  # no delivery for job 1's results
    ([job(1, "succeeded"), job(2, "queued")], [delivery(1, 1, "delivered")], "in_progress"),
    ([job(1, "dead"), job(2, "queued")], [], "failed"),
], ids=["dead-over-held", "dead-delivery", "held-over-running", "no-destination-over-running",
        "queued-behind-done", "dead-over-queued"])
def test_precedence(jobs: list[JobFacts], deliveries: list[DeliveryFacts], expected: str) -> None:
    assert study_status("routed", jobs, deliveries).state == expected


def test_receiving_and_complete_come_before_what_earlier_jobs_say() -> None:
    again = study_status("receiving", [job(1, "dead", error="too few slices")], [])
    assert (again.state, again.reason) == ("receiving", "receiving instances (earlier: job 1 chest-seg dead: too few slices)")
    assert study_status("complete", [job(1, "dead")], []).state == "waiting"
    assert study_status("ignored", [job(1, "dead")], []).state == "failed"  # jobs decide once there are any


def test_every_shown_state_is_reachable_and_deliveries_must_belong_to_a_job() -> None:
    reached = {study_status("receiving", [], []).state, study_status("complete", [], []).state,
               study_status("routed", [job(1, "running")], []).state,
               study_status("routed", [job(1, "succeeded", results=0)], []).state,
               study_status("routed", [job(1, "held")], []).state, study_status("routed", [job(1, "dead")], []).state,
               study_status("ignored", [], []).state}
    assert reached == set(SHOWN_STATES)
    with pytest.raises(ValueError, match=r"deliveries \[9\] belong to no current job"):
        study_status("routed", [job(1, "succeeded")], [delivery(9, 2, "delivered")])


def test_one_line_flattens_and_cuts() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 300, 10) == "x" * 9 + "…"
    assert one_line(None) == ""
