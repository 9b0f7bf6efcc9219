"""Raw-PDU fuzzer against a real node process, plain and over DICOM TLS (issue 20).

Each batch plays seeded misbehaving peers (:mod:`fuzz_pdu_cases`: garbage before and
after association, huge PDU lengths, a garbage command set, release or abort followed
by data, a second A-ASSOCIATE-RQ, stalls mid-header, mid-PDU and mid-message, half-closed
sockets) and a flood of silent connections during which a C-ECHO must still be answered
within 2 s. A stalled or half-closed peer must be dropped within the node's own timeouts
(plus a margin); afterwards no association may be left open, /readyz must be ready,
nothing may be written outside the data directory and a valid study must still be
received and routed.

The batches run against the default receive path (pynetdicom's public API); one more
batch, the first one's cases again, runs against ``dicom.accelerate: true``.

A failure names each case as ``seed S pdu case I [kind]: detail``; replay it with
``fuzz_pdu_cases.make_pdu_case(S, I)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz_campaign import pdu_batch
from fuzz_node import FuzzNode, running_node
from fuzz_pdu_cases import KIND_NAMES, make_pdu_case

pytestmark = pytest.mark.slow

SEED = 20
BATCHES = 3
BATCH_SIZE = 100
TLS_CASES = 2 * len(KIND_NAMES)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with running_node(tmp_path_factory.mktemp("fuzz-pdu")) as fuzzed:
        yield fuzzed


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with running_node(tmp_path_factory.mktemp("fuzz-pdu-tls"), tls=True, label="fuzzed-tls-node") as fuzzed:
        yield fuzzed


@pytest.fixture(scope="module")
def accelerated_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with running_node(tmp_path_factory.mktemp("fuzz-pdu-accel"), overrides={"dicom.accelerate": True},
                      label="fuzzed-accelerated-node") as fuzzed:
        yield fuzzed


@pytest.mark.parametrize("batch", range(BATCHES))
def test_protocol_violations_cost_no_slot_and_leave_the_node_serving(node: FuzzNode, batch: int, tmp_path: Path) -> None:
    cases = [make_pdu_case(SEED, batch * BATCH_SIZE + i) for i in range(BATCH_SIZE)]
    tally = pdu_batch(node, cases, tmp_path)
    assert tally.cases == BATCH_SIZE
    if tally.failures:
        pytest.fail(tally.report(), pytrace=False)


def test_tls_listener_survives_silent_tcp_peers_and_protocol_violations(tls_node: FuzzNode, tmp_path: Path) -> None:
    """Every kind twice over TLS, silent plain-TCP peers (no handshake) among them, and the flood."""
    cases = [make_pdu_case(SEED + 1, i) for i in range(TLS_CASES)]
    tally = pdu_batch(tls_node, cases, tmp_path)
    assert tally.cases == TLS_CASES
    if tally.failures:
        pytest.fail(tally.report(), pytrace=False)


def test_the_accelerated_receive_path_survives_the_same_violations(accelerated_node: FuzzNode, tmp_path: Path) -> None:
    """``dicom.accelerate: true`` against the cases of batch 0."""
    cases = [make_pdu_case(SEED, i) for i in range(BATCH_SIZE)]
    tally = pdu_batch(accelerated_node, cases, tmp_path)
    assert tally.cases == BATCH_SIZE
    if tally.failures:
        pytest.fail(tally.report(), pytrace=False)
