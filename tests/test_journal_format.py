"""The journal's pure parts on plain bytes: the record format against its docstring, and
what ``classify_last_commit`` makes of a bad last COMMIT (torn tail, flipped bit, damage).
"""

from __future__ import annotations

import re

import pytest

import qdash_mp.journal.format as record_format
from qdash_mp.journal import (
    COMMIT_SIZE,
    HEADER,
    RecordType,
    classify_last_commit,
    commit_record,
    record_header,
    scan,
)
from qdash_mp.journal.scan import BLOCK, REPAIR_MAX_BITS
from qdash_mp.records import pack_failed_fields


def _hex_rows(doc: str, label: str) -> list[bytes]:
    """The bytes of every docstring line ``label  xx xx ...`` (``|`` marks are dropped)."""
    rows = []
    for line in doc.splitlines():
        m = re.match(rf"^\s+{label}\s+((?:[0-9a-f]{{2}}[ |]?)+)", line)
        if m:
            rows.append(bytes.fromhex(m.group(1).replace("|", " ")))
    return rows


def test_the_commit_example_in_the_format_docstring() -> None:
    doc = record_format.__doc__ or ""
    i = doc.index("For example, the COMMIT")
    (row,) = [
        bytes.fromhex(line.replace("   ", " "))
        for line in doc[i:].splitlines()[2:3]
        if line.strip()
    ]
    assert row == commit_record(61, 2)
    assert len(row) == COMMIT_SIZE == HEADER.size + 12
    assert row[8] == RecordType.COMMIT


@pytest.mark.parametrize(
    ("label", "verdict"),
    [
        ("flip", "repair"),
        ("zero", "torn"),
        ("block", "torn"),
        ("short", None),
        ("other", "damaged"),
    ],
)
def test_the_last_commit_table_in_the_scan_docstring(label: str, verdict: str | None) -> None:
    doc = scan.__doc__ or ""
    (want,) = _hex_rows(doc, "want")
    assert want == commit_record(61, 2)
    (got,) = _hex_rows(doc, label)
    pos = BLOCK - 4  # the "block" row's boundary falls after its 4th byte
    buf = bytes(pos) + got
    assert classify_last_commit(buf, pos, len(buf), 61, 2) == verdict


def test_the_short_row_is_a_failed_record_cut_short() -> None:
    data = pack_failed_fields("j", "t", b"\x01", 1, None, "q", "e", "", 1.0)
    record = record_header(RecordType.FAILED, data) + data
    (short,) = _hex_rows(scan.__doc__ or "", "short")
    assert record[:COMMIT_SIZE] == short
    assert len(record) == 33
    (other,) = _hex_rows(scan.__doc__ or "", "other")
    assert other == commit_record(0, 99)


def test_every_single_and_double_bit_flip_of_a_last_commit_is_repaired() -> None:
    start, count = 1234, 7
    want = commit_record(start, count)
    pos = 5000
    bits = COMMIT_SIZE * 8
    for a in range(bits):
        for b in range(a, bits, 13):  # a itself, then a sample of second bits
            got = bytearray(want)
            got[a // 8] ^= 1 << (a % 8)
            if b != a:
                got[b // 8] ^= 1 << (b % 8)
            buf = bytes(pos) + bytes(got)
            assert classify_last_commit(buf, pos, len(buf), start, count) == "repair", (a, b)


def test_zeros_from_any_block_boundary_in_a_last_commit_are_torn() -> None:
    start, count = 1234, 7
    want = commit_record(start, count)
    for k in range(COMMIT_SIZE):
        pos = BLOCK - k
        got = want[:k] + bytes(COMMIT_SIZE - k)
        gone = sum(x.bit_count() for x in want[k:])
        buf = bytes(pos) + got
        expected = "repair" if gone <= REPAIR_MAX_BITS else "torn"
        assert classify_last_commit(buf, pos, len(buf), start, count) == expected, k
    # Zeros that do not start at a block boundary are no torn block: damage.
    pos = BLOCK + 100
    got = want[:4] + bytes(COMMIT_SIZE - 4)
    buf = bytes(pos) + got
    assert classify_last_commit(buf, pos, len(buf), start, count) == "damaged"


def test_not_a_commit_slot_is_left_to_the_ordinary_rule() -> None:
    want = commit_record(100, 1)
    buf = bytes(100) + want[:-1]  # a byte short of a COMMIT
    assert classify_last_commit(buf, 100, len(buf), 100, 1) is None
    buf = bytes(100) + bytes(COMMIT_SIZE)  # no record read: not the end of a batch
    assert classify_last_commit(buf, 100, len(buf), 100, 0) is None
