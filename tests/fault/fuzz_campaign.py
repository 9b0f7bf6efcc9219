"""Batches of fuzz cases against a running node, judged, and the invariant checks after them.

The pytest fuzz tests (a few hundred cases) and ``bench/fault.py`` (ten thousand and
more) run the same batches: :func:`store_batch` plays C-STORE cases and judges every
answer with the oracle, :func:`pdu_batch` plays raw-PDU cases (stalls held until the
node drops them) and a flood of silent connections, and both finish with the node's
invariants (:meth:`fuzz_node.FuzzNode.invariant_failures`). Everything lands in a
:class:`Tally`: how the node answered, by code, and each broken invariant with the
cases (seed, index, mutation) that broke it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_node import ECHO_LIMIT_SECONDS, SETTLE_MARGIN_SECONDS, FuzzNode
from fuzz_oracle import stored_instance_problems
from fuzz_pdu_cases import HALF_CLOSE, STALL, PduCase, PduPlay, play
from fuzz_store_cases import EXPECT_REFUSAL, EXPECT_SUCCESS, StoreCase
from fuzz_wire import CLOSED, HANG, REFUSED, Answer, RawConnection, WireError

# Broken invariants of the dataset fuzzer, as tallied.
WRONG_SUCCESS = "wrong success (acknowledged an incomplete, unreadable or refusable instance)"
VALID_REFUSED = "valid instance not stored"
HUNG = "hang (no C-STORE response within the timeout)"
UNANSWERED = "C-STORE answered by abort or close instead of a status"
ASSOCIATION_REFUSED = "association refused"
BUG_STATUS = "status 0xC211 (unexpected error in the node)"
UNDOCUMENTED = "status not documented in docs/conformance.md"
REFUSED_BUT_INDEXED = "refused instance indexed"
MEMORY = "memory not bounded"
# ... and of the raw-PDU fuzzer.
STALL_KEPT = "stalled or half-closed peer not dropped"
FLOOD_ECHO = "C-ECHO slow while silent connections are open"
PDU_CONTROL = "raw-PDU case failed where the node should have served it"

SUCCESS = 0x0000
BUG = 0xC211
#: The C-STORE statuses docs/conformance.md documents.
DOCUMENTED_STATUSES = frozenset({0x0000, 0xA700, 0xA701, 0xA900, 0xC210, 0xC220, 0xC221, 0xC222, 0xC230})
STORE_ANSWER_SECONDS = 15.0
BOMB_ANSWER_SECONDS = 120.0
#: How much the node's peak resident memory may grow while it refuses deflate bombs.
BOMB_MEMORY_LIMIT_KIB = 512 * 1024
STORE_CONCURRENCY = 4
PDU_CONCURRENCY = 4
STALL_GROUP = 10
FLOOD_SOCKETS = 40


@dataclass
class Tally:
    """What a campaign saw: answers by code and broken invariants with the cases that broke them."""

    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[str]] = field(default_factory=dict)
    crashes: int = 0

    def fail(self, invariant: str, message: str) -> None:
        """Record a broken invariant; ``message`` (one line, at most 500 characters) names the case."""
        line = " ".join(message.split())
        self.failures.setdefault(invariant, []).append(line if len(line) <= 500 else line[:497] + "...")

    def count(self, invariant: str) -> int:
        return len(self.failures.get(invariant, []))

    def add(self, other: "Tally") -> None:
        self.cases += other.cases
        self.outcomes.update(other.outcomes)
        self.crashes += other.crashes
        for invariant, messages in other.failures.items():
            self.failures.setdefault(invariant, []).extend(messages)

    def add_invariant_failures(self, messages: Iterable[str]) -> None:
        """Messages of :meth:`FuzzNode.invariant_failures` ("<invariant>: <what>")."""
        for message in messages:
            self.fail(message.split(":", 1)[0], message)

    def report(self, per_invariant: int = 6) -> str:
        """A readable account: outcomes, then each broken invariant with its first cases."""
        lines = [f"{self.cases} cases; outcomes: "
                 + ", ".join(f"{label} x{count}" for label, count in sorted(self.outcomes.items()))]
        for invariant, messages in sorted(self.failures.items()):
            lines.append(f"BROKEN: {invariant} ({len(messages)}):")
            lines += [f"    {message}" for message in messages[:per_invariant]]
            if len(messages) > per_invariant:
                lines.append(f"    ... and {len(messages) - per_invariant} more")
        return "\n".join(lines)


# -- C-STORE cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreResult:
    case: StoreCase
    answer: Answer
    local_port: int | None


def send_store_case(node: FuzzNode, case: StoreCase, timeout: float = STORE_ANSWER_SECONDS) -> StoreResult:
    """One association, one C-STORE of the case's bytes, release."""
    try:
        connection = RawConnection("127.0.0.1", node.port, tls=node.client_ssl_context())
    except OSError as exc:
        return StoreResult(case, Answer(None, f"{CLOSED} (connect: {exc})"), None)
    try:
        sop_class = case.sop_class_uid.decode("ascii", "replace")
        if not connection.associate([(1, sop_class, [case.transfer_syntax_uid])], node.ae_title, timeout=timeout) \
                or 1 not in connection.accepted:
            return StoreResult(case, Answer(None, REFUSED), connection.local_port)
        answer = connection.c_store(1, case.sop_class_uid, case.sop_instance_uid, case.body, timeout)
        if answer.status is not None:
            connection.release(timeout)
        return StoreResult(case, answer, connection.local_port)
    except (OSError, WireError) as exc:
        return StoreResult(case, Answer(None, f"{CLOSED} ({type(exc).__name__}: {exc})"), connection.local_port)
    finally:
        connection.close()


def judge_store_results(node: FuzzNode, results: Sequence[StoreResult], after_id: int) -> Tally:
    """Apply the oracle to every answer (see the module docstring of :mod:`fuzz_oracle`)."""
    tally = Tally(cases=len(results))
    association_by_port = {port: row_id for row_id, port, _ in node.association_rows(after_id)}
    stored: dict[int, list[tuple[str, str]]] = {}
    for association_id, sop_uid, path in node.query(
            "SELECT association_id, sop_instance_uid, path FROM instances WHERE association_id > ?", [after_id]):
        stored.setdefault(int(association_id), []).append((str(sop_uid), str(path)))
    for result in results:
        case, answer = result.case, result.answer
        label = case.label
        tally.outcomes[answer.label] += 1
        rows = stored.get(association_by_port.get(result.local_port, -1), [])
        if answer.status is None:
            invariant = {HANG: HUNG, REFUSED: ASSOCIATION_REFUSED}.get(str(answer.ended), UNANSWERED)
            tally.fail(invariant, f"{label}: {answer.label} after {answer.seconds:.1f} s")
            continue
        if answer.status == BUG:
            tally.fail(BUG_STATUS, label)
        elif answer.status not in DOCUMENTED_STATUSES:
            tally.fail(UNDOCUMENTED, f"{label}: {answer.label}")
        if answer.status != SUCCESS:
            if case.expect == EXPECT_SUCCESS:
                tally.fail(VALID_REFUSED, f"{label}: {answer.label}")
            if rows:
                tally.fail(REFUSED_BUT_INDEXED, f"{label}: {answer.label} but indexed as {rows}")
            continue
        if case.expect == EXPECT_REFUSAL:
            tally.fail(WRONG_SUCCESS, f"{label}: acknowledged although it must be refused")
            continue
        if not rows:
            rows = [(uid, path) for uid, path in node.query(
                "SELECT sop_instance_uid, path FROM instances WHERE sop_instance_uid = ?",
                [case.sop_instance_uid.decode("ascii", "replace").strip("\0 ")])]
        if not rows:
            tally.fail(WRONG_SUCCESS, f"{label}: acknowledged but no instance was indexed")
            continue
        problems = stored_instance_problems(node.spool_dir / rows[0][1], case)
        if problems:
            tally.fail(WRONG_SUCCESS, f"{label}: {'; '.join(problems)}")
    return tally


def store_batch(node: FuzzNode, cases: Sequence[StoreCase], series_dir: Path,
                concurrency: int = STORE_CONCURRENCY, timeout: float = STORE_ANSWER_SECONDS) -> Tally:
    """Send ``cases``, judge the answers, then check the node's invariants."""
    after_id = node.last_association_id()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda case: send_store_case(node, case, timeout), cases))
    if not node.is_running():
        tally = Tally(cases=len(cases), crashes=1)
        tally.add_invariant_failures(node.invariant_failures(after_id, {}, series_dir))
        return tally
    tally = judge_store_results(node, results, after_id)
    cases_by_port = {r.local_port: r.case.label for r in results if r.local_port is not None}
    tally.add_invariant_failures(node.invariant_failures(after_id, cases_by_port, series_dir))
    tally.crashes = 0 if node.is_running() else 1
    return tally


def bomb_batch(node: FuzzNode, bombs: Sequence[StoreCase], series_dir: Path,
               timeout: float = BOMB_ANSWER_SECONDS) -> Tally:
    """Send deflate bombs one at a time: each must be refused, and the node's peak resident memory
    (VmHWM) may grow by :data:`BOMB_MEMORY_LIMIT_KIB` at most, however large the bombs inflate."""
    before = node.peak_memory_kib()
    tally = store_batch(node, bombs, series_dir, concurrency=1, timeout=timeout)
    if node.is_running():
        growth = node.peak_memory_kib() - before
        if growth > BOMB_MEMORY_LIMIT_KIB:
            tally.fail(MEMORY, f"peak resident memory grew by {growth // 1024} MiB refusing {len(bombs)} deflate "
                               f"bomb(s) ({', '.join(f'case {b.index}' for b in bombs)}); limit "
                               f"{BOMB_MEMORY_LIMIT_KIB // 1024} MiB")
    return tally


# -- raw-PDU cases ----------------------------------------------------------------------------


def _await_drops(node: FuzzNode, held: list[PduPlay], tally: Tally) -> None:
    """Wait until the node has closed every held connection; the ones it keeps are failures."""
    limit = node.timeouts + SETTLE_MARGIN_SECONDS
    deadline = min(held_play.started for held_play in held) + limit if held else time.monotonic()
    pending = [held_play for held_play in held if held_play.connection is not None]
    while pending and time.monotonic() < deadline:
        still = []
        for held_play in pending:
            assert held_play.connection is not None
            if held_play.connection.peer_closed_within(0.02):
                held_play.connection.close()
                held_play.connection = None
            else:
                still.append(held_play)
        pending = still
        time.sleep(0.05)
    for held_play in pending:
        tally.fail(STALL_KEPT, f"{held_play.case.label}: connection from port {held_play.local_port} still open "
                               f"{time.monotonic() - held_play.started:.1f} s later (limit {limit:g} s)")
        assert held_play.connection is not None
        held_play.connection.close()
        held_play.connection = None


def _record(tally: Tally, plays: Iterable[PduPlay]) -> None:
    for state in plays:
        tally.outcomes[state.reaction] += 1
        if state.failure:
            tally.fail(PDU_CONTROL, f"{state.case.label}: {state.failure}")


def flood(node: FuzzNode, tally: Tally, sockets: int = FLOOD_SOCKETS) -> dict[int, str]:
    """Open ``sockets`` silent TCP connections, time a C-ECHO meanwhile, then wait for the node to drop them."""
    silent = [PduCase(-1, k, "flood", f"silent TCP connection {k + 1} of {sockets} opened together", False, b"",
                      STALL, raw_tcp=True) for k in range(sockets)]
    held = [play(case, "127.0.0.1", node.port, node.ae_title, None) for case in silent]
    seconds = node.echo_seconds()
    if seconds is None or seconds > ECHO_LIMIT_SECONDS:
        tally.fail(FLOOD_ECHO, f"C-ECHO took {seconds} s (None: no answer) with {sockets} silent connections open")
    _await_drops(node, held, tally)
    return {state.local_port: state.case.label for state in held if state.local_port is not None}


def pdu_batch(node: FuzzNode, cases: Sequence[PduCase], series_dir: Path, concurrency: int = PDU_CONCURRENCY,
              flood_sockets: int = FLOOD_SOCKETS) -> Tally:
    """Play ``cases`` (stalls in groups, held until the node drops them), a flood, then the invariants."""
    after_id = node.last_association_id()
    tally = Tally(cases=len(cases))
    tls = node.client_ssl_context()
    playing: Callable[[PduCase], PduPlay] = lambda case: play(case, "127.0.0.1", node.port, node.ae_title, tls)
    quick = [case for case in cases if case.ending not in (STALL, HALF_CLOSE)]
    held_cases = [case for case in cases if case.ending in (STALL, HALF_CLOSE)]
    plays: list[PduPlay] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        plays += list(pool.map(playing, quick))
        for start in range(0, len(held_cases), STALL_GROUP):
            group = list(pool.map(playing, held_cases[start : start + STALL_GROUP]))
            _await_drops(node, group, tally)
            plays += group
    _record(tally, plays)
    cases_by_port = {state.local_port: state.case.label for state in plays if state.local_port is not None}
    if flood_sockets:
        cases_by_port.update(flood(node, tally, flood_sockets))
    tally.add_invariant_failures(node.invariant_failures(after_id, cases_by_port, series_dir))
    tally.crashes = 0 if node.is_running() else 1
    return tally
