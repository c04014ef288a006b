"""``BatchReader`` decodes a batch's FAILED records in C-level passes: it must read exactly
what reading record by record reads, damaged or not.

The reference is the record-by-record reader it replaced (``_reference``, below, kept
verbatim in spirit: frame, check, decode one record at a time, the first problem in file
order wins). Both read the same bytes -- whole batches of FAILED, REMOVED and CLIENT_SEQ
records, then damaged in one of the ways a file can be: a record that verifies by its CRC
but is no valid FAILED array, a flipped bit, a cut -- and must agree on every batch, the
problem, the pending records and their metas.

Also here: the index's record sizes start narrow ('H') and widen for a big record; the
columns' append sequences (a ``range`` while gapless) hold every slot's; the cyclic GC,
paused while recovery reads, is left as it was.
"""

from __future__ import annotations

import gc
import zlib
from bisect import bisect_left
from itertools import compress, pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdash_mp.errors import JournalCorrupt
from qdash_mp.journal import (
    HEADER,
    BatchReader,
    Problem,
    RecordType,
    append_record,
    commit_record,
    decode_op,
    encode_client_seq,
    encode_removed,
)
from qdash_mp.journal.columns import Columns
from qdash_mp.journal.format import _COMMIT, MAX_PAYLOAD
from qdash_mp.records import FailedRecord, pack_failed, pack_payload
from tests.qdash_testing.journal import fj, open_j, state_of

_FAILED = int(RecordType.FAILED)
_COMMIT_T = int(RecordType.COMMIT)


def _reference(buf: bytes) -> tuple[list[Any], Any]:
    """Every batch, then (problem, committed, pos, pending, pending metas): record by record."""
    pos = committed = pending_start = 0
    pending: list[Any] = []
    metas: list[Any] = []
    batches: list[Any] = []
    end = len(buf)
    while True:
        if pos >= end:
            problem = Problem(pos, "records without a COMMIT at the end") if pending else None
            return batches, (problem, committed, pos, pending, metas)
        if end - pos < HEADER.size:
            return batches, (
                Problem(pos, "incomplete record header"),
                committed,
                pos,
                pending,
                metas,
            )
        crc, n, rtype = HEADER.unpack(buf[pos : pos + HEADER.size])
        stop = pos + HEADER.size + n
        if n > MAX_PAYLOAD or stop > end:
            why = f"record length {n} runs past the end of the data"
            return batches, (Problem(pos, why), committed, pos, pending, metas)
        body = buf[pos + 4 : stop]
        if zlib.crc32(body) != crc:
            return batches, (Problem(pos, "checksum mismatch"), committed, pos, pending, metas)
        if rtype == _COMMIT_T:
            if n != _COMMIT.size:
                return batches, (
                    Problem(pos, "malformed COMMIT record"),
                    committed,
                    pos,
                    pending,
                    metas,
                )
            start, count = _COMMIT.unpack(body[5:])
            if start != pending_start or count != len(pending):
                why = "COMMIT does not match the batch before it"
                return batches, (Problem(pos, why), committed, pos, pending, metas)
            batches.append((pending_start, pending, metas))
            pos = committed = pending_start = stop
            pending, metas = [], []
            continue
        op = decode_op(rtype, body[5:], HEADER.size + n, metas)
        if isinstance(op, str):
            return batches, (Problem(pos, op), committed, pos, pending, metas)
        pending.append(op)
        pos = stop


def _read(buf: bytes) -> tuple[list[Any], Any]:
    reader = BatchReader(buf, 0, len(buf))
    batches = []
    while (got := reader.read_batch()) is not None:
        batches.append((got[0], got[1], reader.metas))
    tail = (reader.problem, reader.committed, reader.pos, reader.pending, reader.pending_metas)
    return batches, tail


def _failed(i: int, error: str = "boom") -> bytes:
    return pack_failed(
        FailedRecord(f"job-{i}", "Task", pack_payload({"i": i}), 1, None, "q", error, "tb", 1.5 + i)
    )


def _not_failed(i: int, how: int) -> bytes:
    """A payload that frames (and checksums) as a record but is no valid FAILED array."""
    bad: list[bytes] = [
        b"\xc1",  # never used in msgpack: does not decode
        _failed(i) + b"\x00",  # extra data
        b"\x93\x01\x02\x03",  # an array of the wrong shape
        _failed(i).replace(b"job-", b"\xff\xfe\xfd\xfc", 1),  # id not UTF-8
        b"\x99" + b"\xc0" * 9,  # nine nils
    ]
    return bad[how % len(bad)]


record_st = st.one_of(
    st.tuples(st.just("failed"), st.integers(0, 50)),
    st.tuples(st.just("removed"), st.integers(0, 50)),
    st.tuples(st.just("seq"), st.integers(0, 50)),
    st.tuples(st.just("bad"), st.integers(0, 50)),
)


def _bytes(batches: list[list[tuple[str, int]]]) -> bytes:
    buf = bytearray()
    for batch in batches:
        start = len(buf)
        for kind, i in batch:
            if kind == "failed":
                append_record(buf, _FAILED, _failed(i, "x" * (i % 7)))
            elif kind == "removed":
                append_record(buf, int(RecordType.REMOVED), encode_removed(f"job-{i}", "retried"))
            elif kind == "seq":
                append_record(buf, int(RecordType.CLIENT_SEQ), encode_client_seq("c", i, 2.5))
            else:
                append_record(buf, _FAILED, _not_failed(i, i))
        buf += commit_record(start, len(batch))
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(st.lists(record_st, min_size=1, max_size=12), min_size=1, max_size=4),
    damage=st.one_of(st.none(), st.tuples(st.sampled_from(["flip", "cut"]), st.floats(0, 1))),
)
def test_batch_reader_reads_what_record_by_record_reads(
    batches: list[list[tuple[str, int]]], damage: tuple[str, float] | None
) -> None:
    buf = _bytes(batches)
    if damage is not None:
        kind, where = damage
        at = min(int(where * len(buf)), len(buf) - 1)
        buf = buf[:at] + bytes([buf[at] ^ 16]) + buf[at + 1 :] if kind == "flip" else buf[:at]
    assert _read(buf) == _reference(buf)


def test_a_bad_failed_record_mid_run_stops_the_batch_there() -> None:
    """The run's bulk decode fails on record 3: the problem is at record 3, records 0..2
    are pending with their metas, as record by record."""
    buf = _bytes([[("failed", 0), ("failed", 1), ("failed", 2), ("bad", 2), ("failed", 4)]])
    batches, (problem, committed, pos, pending, metas) = _read(buf)
    assert batches == []
    assert [op[1] for op in pending] == ["job-0", "job-1", "job-2"]
    assert metas == [("q", "Task", "x" * i) for i in range(3)]
    assert isinstance(problem, Problem)
    assert problem.offset == pos > 0
    assert problem.reason != "checksum mismatch"
    assert committed == 0
    assert (batches, (problem, committed, pos, pending, metas)) == _reference(buf)


@pytest.mark.parametrize("batched", [True, False])
def test_record_sizes_widen_past_64k_and_survive_reopen(tmp_path: Path, batched: bool) -> None:
    """``Index.size`` starts as 'H' and widens when a record over 64 KiB comes (in a run,
    or alone). Each record reads back whole, before and after reopening."""
    big = "x" * 70_000
    with open_j(tmp_path) as j:
        for i in range(5):
            j.stage_failed(fj(i))
        if not batched:
            j.commit()
        j.stage_failed(fj("big", payload=big))
        j.stage_failed(fj(9))
        j.commit()
        assert j._index.size.typecode == "I"
        before = state_of(j)
    with open_j(tmp_path) as j:
        assert j._index.size.typecode == "I"
        assert state_of(j) == before
        assert j.get("big").job.payload == big
    with open_j(tmp_path / "small") as j:
        j.stage_failed(fj(1))
        j.commit()
        assert j._index.size.typecode == "H"


@pytest.mark.parametrize("enabled", [True, False])
def test_open_leaves_the_cyclic_gc_as_it_found_it(tmp_path: Path, enabled: bool) -> None:
    """Recovery pauses the cyclic GC while it reads; after an open -- or one that raises
    ``JournalCorrupt`` -- it is on or off as before."""
    with open_j(tmp_path) as j:
        for i in range(50):
            j.stage_failed(fj(i))
        j.commit()
        j.stage_failed(fj("later"))
        j.commit()
    seg = sorted(tmp_path.glob("*.seg"))[0]
    was = gc.isenabled()
    try:
        if not enabled:
            gc.disable()
        with open_j(tmp_path) as j:
            assert len(j) == 51
        assert gc.isenabled() is enabled
        data = bytearray(seg.read_bytes())
        data[200] ^= 0x01  # a damaged record with a committed batch after it
        seg.write_bytes(bytes(data))
        with pytest.raises(JournalCorrupt):
            open_j(tmp_path)
        assert gc.isenabled() is enabled
    finally:
        if was:
            gc.enable()


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 40)),
            st.tuples(st.just("squeeze"), st.lists(st.booleans(), min_size=0, max_size=200)),
            st.tuples(st.just("prune"), st.integers(0, 60)),  # keep all but the oldest n
            st.tuples(st.just("reset"), st.just(0)),
        ),
        max_size=25,
    )
)
def test_seq_column_as_range_or_array_holds_every_slots_sequence(
    steps: list[tuple[str, Any]],
) -> None:
    """``Columns.seq`` is a ``range`` while the sequences run without a gap and an array
    after a squeeze leaves one; either way it holds each slot's sequence, and
    ``seq_slot`` (the snapshot cut) is ``bisect_left`` of that list."""
    cols = Columns()
    ref: list[int] = []
    nxt = 0
    for kind, arg in steps:
        if kind == "append":
            cols.append(len(ref), [1.0] * arg, [("q", "n", "e")] * arg)
            ref += range(nxt, nxt + arg)
            nxt += arg
        elif kind == "reset":
            cols.reset()
            ref = []
        elif ref:  # (the index squeezes only with dead slots, so never an empty column)
            n = len(ref)
            flags = [True] * n if kind == "prune" else (arg + [True] * n)[:n]
            if kind == "prune":
                flags[: min(arg, n)] = [False] * min(arg, n)
            keep = bytes(map(int, flags))
            cols.squeeze(keep)
            ref = list(compress(ref, keep))
        assert list(cols.seq) == ref
        gapless = all(b - a == 1 for a, b in pairwise(ref))
        assert isinstance(cols.seq, range) or not gapless or kind == "append"
        for x in (0, nxt, nxt - 1, *ref[:3], *ref[-3:]):
            assert cols.seq_slot(x) == bisect_left(ref, x)


@pytest.mark.parametrize("bad_at", [None, 0, 255, 256, 300, 599])
def test_batches_longer_than_a_chunk_read_as_record_by_record(bad_at: int | None) -> None:
    """A batch of 600 records (FAILED, a few others among them) is decoded 256 at a time;
    a bad record in any chunk stops it at that record, as reading record by record does."""
    batch = [("seq" if i % 97 == 50 else "failed", i) for i in range(600)]
    if bad_at is not None:
        batch[bad_at] = ("bad", bad_at)
    buf = _bytes([batch, [("failed", 1), ("failed", 2)]])
    got = _read(buf)
    assert got == _reference(buf)
    batches, (problem, _committed, _pos, pending, _metas) = got
    if bad_at is None:
        assert len(batches) == 2
        assert problem is None
    else:
        assert batches == []
        assert isinstance(problem, Problem)
        assert len(pending) == bad_at
