"""C-STORE dataset fuzzer against a real node process (issue 20).

Three batches of seeded cases (truncations anywhere, exactly at an element boundary and
inside pixel data; Pixel Data dropped; header bytes flipped; wrong element lengths,
past the end included; a transfer syntax claimed that the bytes are not in; hostile
UIDs) and deflate bombs. Every answer is judged by the oracle (:mod:`fuzz_oracle`):
a success must have stored a complete, readable instance, an unmutated one must be
stored, every C-STORE must be answered with a documented status. After each batch the
node must answer C-ECHO within 2 s, hold no association, have written nothing outside
its data directory and still receive and route a valid study.

A failure names each case as ``seed S case I [mutation] base: detail``; replay it with
``fuzz_store_cases.make_case(load_bases(dir), S, I)``.

The batches and bombs run against the default receive path (pynetdicom's public API);
the first batch's cases and the bombs run again with ``dicom.accelerate: true``. ``bench/fault.py`` runs the long
campaign with the same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz_campaign import bomb_batch, store_batch
from fuzz_node import FuzzNode, running_node
from fuzz_store_cases import BaseInstance, deflate_bomb, load_bases, make_case

pytestmark = pytest.mark.slow

SEED = 20
BATCHES = 3
BATCH_SIZE = 100
#: The CI deflate bomb: about 1 MB on the wire, 1 GiB inflated.
BOMB_BYTES = 1 << 30


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[BaseInstance]:
    return load_bases(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with running_node(tmp_path_factory.mktemp("fuzz-cstore")) as fuzzed:
        yield fuzzed


@pytest.fixture(scope="module")
def accelerated_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    with running_node(tmp_path_factory.mktemp("fuzz-cstore-accel"), overrides={"dicom.accelerate": True},
                      label="fuzzed-accelerated-node") as fuzzed:
        yield fuzzed


@pytest.mark.parametrize("batch", range(BATCHES))
def test_mutated_instances_are_answered_and_only_complete_ones_acknowledged(
    node: FuzzNode, bases: list[BaseInstance], batch: int, tmp_path: Path
) -> None:
    cases = [make_case(bases, SEED, batch * BATCH_SIZE + i) for i in range(BATCH_SIZE)]
    tally = store_batch(node, cases, tmp_path)
    assert tally.cases == BATCH_SIZE
    if tally.failures:
        pytest.fail(tally.report(), pytrace=False)


def test_deflate_bombs_are_refused_without_inflating_them_in_memory(
    node: FuzzNode, bases: list[BaseInstance], tmp_path: Path
) -> None:
    base = next(b for b in bases if b.name == "CT_small.dcm")
    bombs = [deflate_bomb(base, SEED, 100_000 + k, BOMB_BYTES, consistent=k == 0) for k in range(2)]
    assert all(len(bomb.body) < 2 << 20 for bomb in bombs)
    tally = bomb_batch(node, bombs, tmp_path)
    if tally.failures:
        pytest.fail(tally.report(), pytrace=False)


def test_the_accelerated_receive_path_answers_the_same_cases_and_bombs(
    accelerated_node: FuzzNode, bases: list[BaseInstance], tmp_path: Path
) -> None:
    """``dicom.accelerate: true`` against the cases of batch 0 and the two bombs."""
    cases = [make_case(bases, SEED, i) for i in range(BATCH_SIZE)]
    tally = store_batch(accelerated_node, cases, tmp_path)
    assert tally.cases == BATCH_SIZE
    base = next(b for b in bases if b.name == "CT_small.dcm")
    bombs = [deflate_bomb(base, SEED, 100_000 + k, BOMB_BYTES, consistent=k == 0) for k in range(2)]
    bomb_tally = bomb_batch(accelerated_node, bombs, tmp_path)
    failures = [tally.report()] if tally.failures else []
    failures += [bomb_tally.report()] if bomb_tally.failures else []
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
