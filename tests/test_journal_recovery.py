"""Journal recovery: torn tails are cut (saved, logged), damage is refused with the file,
the offset and ``--salvage``, salvage keeps what verifies, and a damaged last COMMIT of a
batch written whole is repaired, never cut as a torn tail (hole 4).
"""

from __future__ import annotations

import logging
import random
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import pytest
from qdash_testing.journal import (
    T0,
    commit_ends,
    fj,
    ids_of,
    open_j,
    records,
    segments,
)

from qdash_mp.errors import JournalCorrupt
from qdash_mp.journal import (
    HEADER,
    RecordType,
    record_header,
)
from qdash_mp.models import FailedJob, Job

# -- torn tails, bit flips, bad records --------------------------------------------------------


def _build_small_journal(
    path: Path, n: int, rng: random.Random
) -> tuple[list[list[str]], dict[str, FailedJob]]:
    """A journal of ``n`` tiny records committed in batches of 1-3; returns the batches."""
    batches: list[list[str]] = []
    jobs: dict[str, FailedJob] = {}
    with open_j(path) as j:
        i = 0
        while i < n:
            batch = []
            for _ in range(rng.randint(1, 3)):
                f = FailedJob(
                    id=f"{i}",
                    queue="q",
                    job=Job(id=f"{i}", name="t", payload=i % 7),
                    error="e",
                    failed_at=datetime.fromtimestamp(T0, UTC),
                )
                j.stage_failed(f)
                jobs[f.id] = f
                batch.append(f.id)
                i += 1
            j.commit()
            batches.append(batch)
    return batches, jobs


def test_truncation_at_every_byte_offset_keeps_exactly_the_whole_batches(root: Path) -> None:
    src = root / "src"
    batches, _jobs = _build_small_journal(src, 200, random.Random(1))
    (seg,) = segments(src)
    data = seg.read_bytes()
    ends = commit_ends(data)
    assert len(ends) == len(batches)
    work = root / "work"
    work.mkdir()
    target = work / seg.name
    header_end = records(data)[0][1]
    for cut in range(len(data) + 1):
        for p in work.iterdir():
            p.unlink()
        target.write_bytes(data[:cut])
        whole = sum(1 for e in ends if e <= cut)
        expected = [i for b in batches[:whole] for i in b]
        with open_j(work) as j:
            assert len(j) == len(expected), cut
            assert all(i in j for i in expected), cut
            if expected:
                assert j.page(0, 1)[0].id == expected[-1], cut
            base = ends[whole - 1] if whole else (header_end if cut >= header_end else 0)
            assert j.recovery.bytes_cut == cut - base, cut
    assert ends[-1] == len(data)


def test_torn_tail_is_cut_saved_and_logged(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    jdir = root / "j"
    batches, _ = _build_small_journal(jdir, 10, random.Random(2))
    (seg,) = segments(jdir)
    size = seg.stat().st_size
    original = seg.read_bytes()
    with seg.open("r+b") as fh:
        fh.truncate(size - 5)
    with caplog.at_level(logging.WARNING, logger="qdash_mp.journal"), open_j(jdir) as j:
        assert ids_of(j) == [i for b in batches[:-1] for i in b][::-1]
        (cut,) = j.recovery.cuts
        assert cut.file == seg
        assert cut.length == j.recovery.bytes_cut > 0
        assert cut.offset == size - 5 - cut.length
        assert cut.side_file.exists()
        assert cut.side_file.read_bytes() == original[cut.offset : size - 5]
        assert seg.stat().st_size == cut.offset
    assert any(
        str(seg) in r.getMessage()
        and f"offset {cut.offset}" in r.getMessage()
        and f"{cut.length} bytes" in r.getMessage()
        for r in caplog.records
    )
    with open_j(jdir) as j:  # clean now
        assert j.recovery.cuts == []


def test_zero_filled_tail_is_cut(jdir: Path) -> None:
    with open_j(jdir) as j:
        for i in range(5):
            j.stage_failed(fj(i))
            j.commit()
    (seg,) = segments(jdir)
    size = seg.stat().st_size
    with seg.open("ab") as fh:
        fh.write(bytes(8192))
    with open_j(jdir) as j:
        assert len(j) == 5
        (cut,) = j.recovery.cuts
        assert (cut.offset, cut.length) == (size, 8192)
        assert cut.side_file.read_bytes() == bytes(8192)
    assert seg.stat().st_size == size


def _refit_crc(data: bytearray, pos: int) -> None:
    n = struct.unpack_from("<I", data, pos + 4)[0]
    struct.pack_into("<I", data, pos, zlib.crc32(bytes(data[pos + 4 : pos + HEADER.size + n])))


def _damaged(jdir: Path, damage: Callable[[bytearray, list[tuple[int, int, int]]], None]) -> Path:
    (seg,) = segments(jdir)
    data = bytearray(seg.read_bytes())
    damage(data, records(bytes(data)))
    seg.write_bytes(bytes(data))
    return seg


def _ten_batches(jdir: Path) -> None:
    with open_j(jdir) as j:
        for i in range(10):
            j.stage_failed(fj(i))
            j.stage_client_seq("client", i + 1)
            j.commit()


@pytest.mark.parametrize(
    ("new_type", "why"),
    [
        (RecordType.REMOVED, "REMOVED"),
        (RecordType.CLIENT_SEQ, "CLIENT_SEQ"),
        (RecordType.FLUSHED, "FLUSHED"),
        (RecordType.COMMIT, "COMMIT"),
        (RecordType.SEGMENT, "not allowed"),
        (0, "type 0"),
        (99, "type 99"),
    ],
)
def test_bad_type_with_fixed_up_checksum_is_corruption(jdir: Path, new_type: int, why: str) -> None:
    _ten_batches(jdir)

    def retype(data: bytearray, recs: list[tuple[int, int, int]]) -> None:
        failed = [r for r in recs if r[2] == RecordType.FAILED]
        pos = failed[3][0]
        data[pos + 8] = new_type
        _refit_crc(data, pos)

    seg = _damaged(jdir, retype)
    with pytest.raises(JournalCorrupt) as info:
        open_j(jdir)
    message = str(info.value)
    assert why in message
    assert str(seg) in message
    assert "offset" in message
    assert "--salvage" in message
    with open_j(jdir, salvage=True) as j:
        assert sorted(ids_of(j)) == sorted(f"job-{i}" for i in range(10) if i != 3)
        assert j.client_seqs == {"client": 10}


def test_bad_type_in_the_last_batch_is_still_corruption(jdir: Path) -> None:
    _ten_batches(jdir)

    def retype(data: bytearray, recs: list[tuple[int, int, int]]) -> None:
        pos = [r for r in recs if r[2] == RecordType.FAILED][-1][0]
        data[pos + 8] = RecordType.REMOVED
        _refit_crc(data, pos)

    _damaged(jdir, retype)
    # The batch's COMMIT still verifies, so this is damage inside committed data: refused.
    with pytest.raises(JournalCorrupt, match="--salvage"):
        open_j(jdir)


@pytest.mark.parametrize("fix_crc", [False, True])
def test_bad_length_is_detected(jdir: Path, fix_crc: bool) -> None:
    _ten_batches(jdir)

    def relength(data: bytearray, recs: list[tuple[int, int, int]]) -> None:
        pos = [r for r in recs if r[2] == RecordType.FAILED][4][0]
        n = struct.unpack_from("<I", data, pos + 4)[0]
        struct.pack_into("<I", data, pos + 4, n + 3)
        if fix_crc:
            _refit_crc(data, pos)

    _damaged(jdir, relength)
    with pytest.raises(JournalCorrupt, match="--salvage"):
        open_j(jdir)
    with open_j(jdir, salvage=True) as j:
        assert sorted(ids_of(j)) == sorted(f"job-{i}" for i in range(10) if i != 4)


def test_huge_length_in_the_last_record_is_a_torn_tail(jdir: Path) -> None:
    _ten_batches(jdir)

    def relength(data: bytearray, recs: list[tuple[int, int, int]]) -> None:
        struct.pack_into("<I", data, recs[-1][0] + 4, 0xFFFFFFFF)

    _damaged(jdir, relength)
    with open_j(jdir) as j:
        assert sorted(ids_of(j)) == sorted(f"job-{i}" for i in range(9))
        assert j.client_seqs == {"client": 9}
        assert len(j.recovery.cuts) == 1


def test_zeroed_bytes_followed_by_committed_records_are_corruption(jdir: Path) -> None:
    _ten_batches(jdir)

    def zero(data: bytearray, recs: list[tuple[int, int, int]]) -> None:
        pos, size, _ = recs[5]
        data[pos : pos + size] = bytes(size)

    _damaged(jdir, zero)
    with pytest.raises(JournalCorrupt, match="--salvage"):
        open_j(jdir)


def test_random_bit_flips_are_detected_or_harmless(root: Path) -> None:
    src = root / "src"
    _batches, jobs = _build_small_journal(src, 40, random.Random(3))
    (seg,) = segments(src)
    data = seg.read_bytes()
    rng = random.Random(12345)
    work = root / "work"
    work.mkdir()
    target = work / seg.name
    outcomes: Counter[str] = Counter()
    for _ in range(10_000):
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        for p in work.iterdir():
            p.unlink()
        target.write_bytes(flipped)
        try:
            j = open_j(work)
        except JournalCorrupt as exc:
            message = str(exc)
            assert "--salvage" in message, message
            assert "offset" in message, message
            outcomes["refused"] += 1
            continue
        with j:
            got = ids_of(j)
            for jid in got:
                assert j.get(jid) == jobs[jid], (bit, jid)
            # Every batch was acknowledged: a flipped bit never loses one (not even the
            # last, whose damaged COMMIT is repaired rather than cut as a torn tail).
            assert len(got) == len(jobs), bit
            assert not j.recovery.cuts, bit
            outcomes["repaired" if j.recovery.repaired else "harmless"] += 1
    assert outcomes["refused"] > 0
    assert outcomes["repaired"] > 0
    assert sum(outcomes.values()) == 10_000


def test_damage_found_while_reading_is_reported_not_returned(jdir: Path) -> None:
    with open_j(jdir) as j:
        for i in range(3):
            j.stage_failed(fj(i))
        j.commit()
        (seg,) = segments(jdir)
        data = seg.read_bytes()
        recs = [r for r in records(data) if r[2] == RecordType.FAILED]
        pos = recs[1][0] + 20
        with seg.open("r+b") as fh:
            fh.seek(pos)
            fh.write(bytes([data[pos] ^ 0x40]))
        assert j.get("job-0") == fj(0)
        with pytest.raises(JournalCorrupt, match="--salvage"):
            j.get("job-1")
        with pytest.raises(JournalCorrupt):
            j.page(0, 10)


def test_salvage_keeps_every_record_that_verifies(jdir: Path) -> None:
    with open_j(jdir, segment_bytes=4096) as j:
        for i in range(120):
            j.stage_failed(fj(i))
            if i % 3 == 2:
                j.commit()
        j.commit()
        before = {i: j.get(i) for i in ids_of(j)}
        segs = segments(jdir)
    assert len(segs) > 2
    victims: set[str] = set()
    for seg in segs[:-1]:  # damage one FAILED record in each full segment
        data = bytearray(seg.read_bytes())
        pos, _size, _ = [r for r in records(bytes(data)) if r[2] == RecordType.FAILED][1]
        victims.add(msgpack.unpackb(bytes(data[pos + HEADER.size : pos + _size]))[0])
        data[pos + 12] ^= 0xFF
        seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="--salvage"):
        open_j(jdir)
    with open_j(jdir, salvage=True) as j:
        assert len(j.recovery.skipped) == len(segs) - 1
        assert all(s.length > 0 for s in j.recovery.skipped)
        corrupt_copies = [p for p in jdir.iterdir() if ".corrupt-" in p.name]
        assert len(corrupt_copies) == len(segs) - 1
        assert set(ids_of(j)) == set(before) - victims
        for i in ids_of(j):
            assert j.get(i) == before[i]
    with open_j(jdir) as j:  # salvage rewrote the journal: it opens cleanly now
        assert set(ids_of(j)) == set(before) - victims
        assert j.recovery.skipped == []


def test_a_missing_segment_is_corruption(jdir: Path) -> None:
    with open_j(jdir, segment_bytes=4096) as j:
        for i in range(200):
            j.stage_failed(fj(i))
            j.commit()
    segs = segments(jdir)
    assert len(segs) >= 3
    segs[1].unlink()
    with pytest.raises(JournalCorrupt, match="missing"):
        open_j(jdir)
    segs[0].unlink()
    with pytest.raises(JournalCorrupt, match="missing"):
        open_j(jdir)


# -- hole 4: damage to the last COMMIT vs. a torn tail ----------------------------------------

_PAGE = 4096


def _acked_batches(jdir: Path, batches: int = 40) -> list[str]:
    """A journal of acknowledged batches (each commit returned) bigger than a page."""
    acked: list[str] = []
    with open_j(jdir) as j:
        for b in range(batches):
            for i in range(3):
                j.stage_failed(fj(f"b{b}-{i}"))
                acked.append(f"b{b}-{i}")
            j.stage_client_seq("client", b + 1)
            j.commit()
    return acked


def test_a_flipped_bit_in_the_last_commit_never_drops_an_acknowledged_batch(root: Path) -> None:
    src = root / "src"
    acked = _acked_batches(src)
    (seg,) = segments(src)
    data = seg.read_bytes()
    pos, size, rtype = records(data)[-1]
    assert rtype == RecordType.COMMIT
    assert pos + size == len(data)
    work = root / "work"
    outcomes: Counter[str] = Counter()
    for byte in range(pos, pos + size):
        for bit in range(8):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            (work / seg.name).write_bytes(bytes(flipped))
            try:
                j = open_j(work)
            except JournalCorrupt as exc:
                message = str(exc)
                assert str(work / seg.name) in message, message
                assert "offset" in message, message
                assert "--salvage" in message, message
                outcomes["refused"] += 1
                continue
            with j:
                assert sorted(ids_of(j)) == sorted(acked), (byte, bit)
                assert j.client_seqs == {"client": 40}, (byte, bit)
                assert j.recovery.bytes_cut == 0, (byte, bit)
            with open_j(work) as again:  # and it stays whole
                assert sorted(ids_of(again)) == sorted(acked), (byte, bit)
            outcomes["kept"] += 1
    assert sum(outcomes.values()) == size * 8


def test_a_torn_last_commit_is_still_cut_silently(root: Path) -> None:
    src = root / "src"
    acked = _acked_batches(src)
    (seg,) = segments(src)
    data = seg.read_bytes()
    pos, size, _ = records(data)[-1]
    assert len(data) > 2 * _PAGE
    before_last = acked[:-3]
    work = root / "work"

    def opens_with(image: bytes) -> list[str]:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        (work / seg.name).write_bytes(image)
        with open_j(work) as j:
            return sorted(ids_of(j))

    # A short file: the write stopped somewhere in the last COMMIT.
    for cut in range(pos, pos + size):
        assert opens_with(data[:cut]) == sorted(before_last), cut
    # A zero-filled last page: the file grew, its last page never reached the disk.
    page = (len(data) - 1) // _PAGE * _PAGE
    zeroed = data[:page] + bytes(len(data) - page)
    whole = sum(1 for e in commit_ends(data) if e <= page)
    assert opens_with(zeroed) == sorted(acked[: 3 * whole])
    # The last COMMIT alone zero-filled (its sector never written).
    assert opens_with(data[:pos] + bytes(size)) == sorted(before_last)


def test_a_repaired_last_commit_is_reported_and_its_bytes_kept(root: Path) -> None:
    jdir = root / "j"
    acked = _acked_batches(jdir, batches=5)
    (seg,) = segments(jdir)
    data = bytearray(seg.read_bytes())
    pos, size, _ = records(bytes(data))[-1]
    data[pos + 2] ^= 0x10
    seg.write_bytes(bytes(data))
    with open_j(jdir) as j:
        (rep,) = j.recovery.repaired
        assert (rep.file, rep.offset) == (seg, pos)
        assert rep.side_file.read_bytes() == bytes(data[pos : pos + size])
        assert sorted(ids_of(j)) == sorted(acked)
    with open_j(jdir) as j:  # rewritten in place: clean now
        assert j.recovery.repaired == []
        assert sorted(ids_of(j)) == sorted(acked)


def test_a_last_commit_beyond_repair_is_refused_and_salvage_keeps_the_batch(root: Path) -> None:
    jdir = root / "j"
    acked = _acked_batches(jdir, batches=5)
    (seg,) = segments(jdir)
    data = bytearray(seg.read_bytes())
    pos, size, _ = records(bytes(data))[-1]
    data[pos : pos + size] = record_header(RecordType.COMMIT, bytes(12)) + bytes(12)
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as info:
        open_j(jdir)
    message = str(info.value)
    assert str(seg) in message
    assert f"offset {pos}" in message
    assert "--salvage" in message
    with open_j(jdir, salvage=True) as j:
        assert sorted(ids_of(j)) == sorted(acked)
    with open_j(jdir) as j:
        assert sorted(ids_of(j)) == sorted(acked)
