"""The fuzzers' own machinery, without a node: cases replay from their seed, mutations
really mutate, the oracle tells a complete instance from a broken one, bombs inflate to
what they announce. A fuzzer whose oracle accepted everything would pass against any node.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from fuzz_dicom import COLUMNS, EXPLICIT_VR_LE, ROWS, Encoding, find, walk
from fuzz_oracle import stored_instance_problems
from fuzz_pdu_cases import KIND_NAMES, STALL, make_pdu_case
from fuzz_store_cases import (
    EXPECT_REFUSAL,
    EXPECT_SUCCESS,
    MUTATIONS,
    BaseInstance,
    StoreCase,
    deflate_bomb,
    load_bases,
    make_case,
)
from fuzz_wire import c_store_rq, parse_command
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.spool import file_meta_bytes


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[BaseInstance]:
    return load_bases(tmp_path_factory.mktemp("fuzz-bases"))


def stored(tmp_path: Path, case: StoreCase) -> Path:
    """``case`` written as the node writes what it receives: its file meta, then the bytes as sent."""
    path = tmp_path / f"case-{case.index}.dcm"
    meta = file_meta_bytes(case.sop_class_uid.decode(), case.sop_instance_uid.decode("ascii", "replace"),
                           case.transfer_syntax_uid, "FUZZER")
    path.write_bytes(meta + case.body)
    return path


def test_a_case_is_a_function_of_its_seed_and_index(bases: list[BaseInstance]) -> None:
    assert make_case(bases, 5, 17) == make_case(bases, 5, 17)
    assert make_case(bases, 5, 17).body != make_case(bases, 6, 17).body
    assert make_case(bases, 5, 17).sop_instance_uid != make_case(bases, 5, 17 + len(MUTATIONS)).sop_instance_uid
    assert make_pdu_case(5, 3) == make_pdu_case(5, 3)


def test_every_mutation_and_pdu_kind_is_played_within_one_batch(bases: list[BaseInstance]) -> None:
    assert {make_case(bases, 1, i).mutation for i in range(100)} == set(MUTATIONS)
    kinds = {make_pdu_case(1, i).kind for i in range(100)}
    assert kinds == set(KIND_NAMES)
    assert any(make_pdu_case(1, i).ending == STALL for i in range(100))


def test_the_oracle_accepts_every_unmutated_base(bases: list[BaseInstance], tmp_path: Path) -> None:
    valid = [make_case(bases, 3, i) for i in range(0, 200 * len(MUTATIONS), len(MUTATIONS))]
    assert {case.expect for case in valid} == {EXPECT_SUCCESS}
    assert {case.base for case in valid} == {base.name for base in bases}
    valid = list({case.base: case for case in valid}.values())
    for case in valid:
        assert stored_instance_problems(stored(tmp_path, case), case) == [], case.label


def test_the_oracle_rejects_truncated_pixel_less_and_overlong_instances(bases: list[BaseInstance], tmp_path: Path) -> None:
    judged = {}
    for index in range(200):
        case = make_case(bases, 4, index)
        if case.mutation in ("truncate-pixels", "drop-pixel-data", "truncate-boundary") and case.image:
            judged[case.label] = stored_instance_problems(stored(tmp_path, case), case)
    refused = [label for label, problems in judged.items() if problems]
    # A cut exactly before trailing padding (FFFC,FFFC) leaves a complete image: the only acceptable miss.
    missed = [label for label, problems in judged.items() if not problems and "(FFFC,FFFC)" not in label]
    assert len(judged) > 40 and len(refused) > 40
    assert missed == []


def test_a_deflate_bomb_inflates_to_what_it_announces(bases: list[BaseInstance]) -> None:
    base = next(b for b in bases if b.name == "CT_small.dcm")
    pixel_bytes = 64 << 20
    bomb = deflate_bomb(base, 1, 0, pixel_bytes, consistent=True)
    assert bomb.transfer_syntax_uid == DeflatedExplicitVRLittleEndian and bomb.expect == EXPECT_REFUSAL
    assert len(bomb.body) < pixel_bytes // 500
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(bomb.body, 1 << 20)
    total = len(head)
    while inflater.unconsumed_tail:
        total += len(inflater.decompress(inflater.unconsumed_tail, 16 << 20))
    total += len(inflater.flush())
    assert inflater.eof
    header_end = total - pixel_bytes - 12
    assert head[header_end : header_end + 12] == struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    elements = walk(head[:header_end], Encoding.of(EXPLICIT_VR_LE))
    rows, columns = (find(elements, tag) for tag in (ROWS, COLUMNS))
    assert rows is not None and columns is not None
    assert struct.unpack("<H", head[rows.value_start : rows.end])[0] * struct.unpack(
        "<H", head[columns.value_start : columns.end])[0] * 2 == pixel_bytes


def test_command_sets_round_trip_with_hostile_uids() -> None:
    command = parse_command(c_store_rq(9, b"1.2.840.10008.5.1.4.1.1.2", b"../../x\0\xff"))
    assert command[0x00001000] == b"../../x\0\xff\0"  # padded to even length, hostile bytes kept
    assert command[0x00000110] == b"\x09\x00"
