"""The worker's result encoder: one thread, work in the order handed over, at most ``pending`` at a time."""

from __future__ import annotations

import threading
import time

import pytest

from workers.encoder import ResultEncoder


def test_work_runs_in_order_in_one_thread_and_wait_idle_waits_for_all_of_it() -> None:
    encoder = ResultEncoder(pending=3)
    done: list[tuple[int, str]] = []
    gate = threading.Event()
    encoder.submit(gate.wait)
    for n in (1, 2):
        encoder.submit(lambda n=n: done.append((n, threading.current_thread().name)))
    assert not encoder.wait_idle(timeout=0.2) and encoder.outstanding == 3 and done == []
    gate.set()
    assert encoder.wait_idle(timeout=10)
    assert done == [(1, "result-encoder"), (2, "result-encoder")] and encoder.outstanding == 0


def test_submit_blocks_while_pending_work_is_unfinished() -> None:
    encoder = ResultEncoder(pending=1)
    gate = threading.Event()
    encoder.submit(gate.wait)
    second_handed = threading.Event()

    def hand_over_the_next() -> None:
        encoder.submit(lambda: None)
        second_handed.set()

    threading.Thread(target=hand_over_the_next, daemon=True).start()
    assert not second_handed.wait(0.3), "the next job must wait while one is handed over and unfinished"
    gate.set()
    assert second_handed.wait(10) and encoder.wait_idle(timeout=10)


def test_work_that_raises_is_logged_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    encoder = ResultEncoder(pending=1)
    ran = threading.Event()

    def broken() -> None:
        raise RuntimeError("an encoder bug")

    encoder.submit(broken)
    encoder.submit(ran.set)  # the slot of the broken work was given back
    assert ran.wait(10) and encoder.wait_idle(timeout=10)
    assert any("work handed over raised" in r.message and r.exc_info for r in caplog.records)


def test_no_thread_before_the_first_work_and_pending_must_be_positive() -> None:
    before = {t.name for t in threading.enumerate()}
    encoder = ResultEncoder(pending=2, name="encoder-of-this-test")
    time.sleep(0.05)
    assert "encoder-of-this-test" not in {t.name for t in threading.enumerate()} - before
    assert encoder.pending == 2 and encoder.wait_idle(timeout=0)
    with pytest.raises(ValueError, match="pending must be at least 1, got 0"):
        ResultEncoder(pending=0)
