"""The failed-job journal's store, promise by promise: round trips, visibility of committed
state only, failing writes and fsyncs lose and duplicate nothing, retention prunes oldest
first and says so, group commit shares fsyncs, SIGKILL loses no acknowledged record.
Recovery and compaction have their own files (``test_journal_recovery.py``,
``test_journal_compaction.py``); the pure parts are in ``test_journal_format.py``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from qdash_testing.journal import (
    T0,
    Clock,
    fj,
    ids_of,
    open_j,
    segments,
)

from qdash_mp.errors import ConfigError, JournalError, NotFound
from qdash_mp.fsio import FileIO, fsync_dir, pwrite_all, write_atomically
from qdash_mp.journal import (
    ERROR_PREVIEW,
    MAX_PAYLOAD,
    GroupCommit,
    RecordType,
    record_header,
)
from qdash_mp.models import FailedJob, Job
from qdash_mp.records import pack_failed_fields

# -- basics ------------------------------------------------------------------------------------


def test_roundtrip_commit_reopen(jdir: Path) -> None:
    payloads: list[Any] = [
        None,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        "é🚀",
        b"\x00bin",
        [1, [2, [3]]],
        {"a": {"b": None}, 5: "int key"},
    ]
    jobs = [fj(i, at=T0 + i, payload=p) for i, p in enumerate(payloads)]
    with open_j(jdir) as j:
        for f in jobs:
            j.stage_failed(f)
        j.commit()
        assert len(j) == len(jobs)
        for f in jobs:
            assert j.get(f.id) == f
    with open_j(jdir) as j:
        assert j.recovery.records == len(jobs)
        assert j.recovery.bytes_cut == 0
        assert ids_of(j) == [f.id for f in reversed(jobs)]
        for f in jobs:
            assert j.get(f.id) == f
            assert f.id in j
        assert "nope" not in j
        with pytest.raises(NotFound):
            j.get("nope")


def test_page_rows_carry_an_error_preview(jdir: Path) -> None:
    long_error = "E" * 500 + "tail"
    with open_j(jdir) as j:
        j.stage_failed(fj(1, error=long_error))
        j.commit()
        (row,) = j.page(0, 10)
        assert row.error == long_error[:ERROR_PREVIEW]
        assert (row.id, row.queue, row.name, row.attempts) == (
            "job-1",
            fj(1).queue,
            "tasks.work",
            2,
        )
        assert row.failed_at == datetime.fromtimestamp(T0, UTC)
        assert j.get("job-1").error == long_error
        assert j.page(1, 10) == []
        assert j.page(0, 0) == []
        with pytest.raises(ValueError, match="negative"):
            j.page(-1, 5)


def test_payload_raw_is_stored_verbatim(jdir: Path) -> None:
    # A non-canonical encoding (1 as uint32) that a decode/re-encode round trip would change.
    raw = b"\x92\xce\x00\x00\x00\x01\xa1x"
    with open_j(jdir) as j:
        j.stage_failed(fj(1, payload="ignored"), payload_raw=raw)
        j.commit()
    with open_j(jdir) as j:
        failed, stored = j.get_raw("job-1")
        assert stored == raw
        assert failed.job.payload == [1, "x"]


def test_naive_datetimes_and_int_times_are_taken_as_utc(jdir: Path) -> None:
    naive = FailedJob(
        id="n",
        queue="q",
        job=Job(id="n", name="t", enqueued_at=int(T0)),  # type: ignore[arg-type]
        error="e",
        failed_at=datetime(2024, 5, 1, 12, 0, 0),
    )
    with open_j(jdir) as j:
        j.stage_failed(naive)
        j.commit()
        got = j.get("n")
        assert got.failed_at == datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
        assert got.job.enqueued_at == T0
        assert isinstance(got.job.enqueued_at, float)


@pytest.mark.parametrize(
    "bad",
    [
        {"id": ""},
        {"id": 5},
        {"name": None},
        {"attempts": "2"},
        {"attempts": True},
        {"attempts": 2**70},
        {"queue": b"q"},
        {"error": "\udcff lone surrogate"},
        {"failed_at": "yesterday"},
        {"failed_at": -1.0},
        {"payload_raw": 12},
        # What the wire refuses, the journal refuses too (one check, protocol.check_failed).
        {"name": "n" * 1025},
        {"queue": ""},
        {"payload_raw": b"\xc0\xc0"},
        {"payload_raw": b"\xd4\x05\x00"},
    ],
)
def test_unencodable_failures_are_refused_and_nothing_is_staged(
    jdir: Path, bad: dict[str, Any]
) -> None:
    fields: dict[str, Any] = {
        "id": "x",
        "name": "t",
        "payload_raw": b"\xc0",
        "attempts": 1,
        "enqueued_at": None,
        "queue": "q",
        "error": "e",
        "traceback": "",
        "failed_at": T0,
    }
    fields.update(bad)
    failed = FailedJob(
        id=fields["id"],
        queue=fields["queue"],
        job=Job(
            id="x",
            name=fields["name"],
            attempts=fields["attempts"],
            enqueued_at=fields["enqueued_at"],
        ),
        error=fields["error"],
        failed_at=fields["failed_at"],
        traceback=fields["traceback"],
    )
    with open_j(jdir) as j:
        with pytest.raises(JournalError):
            j.stage_failed(failed, payload_raw=fields["payload_raw"])
        assert j.staged == 0
        with pytest.raises(JournalError, match="msgpack"):
            j.stage_failed(fj(1, payload=object()))
        assert j.staged == 0


def test_stage_failed_packed_is_all_or_nothing(jdir: Path) -> None:
    raw = msgpack.packb({"k": [1, 2]})
    good = packed("a", T0)
    too_big = (b"\x00" * (MAX_PAYLOAD + 1), "b", T0)
    with open_j(jdir, max_jobs=2) as j:
        with pytest.raises(JournalError, match="'b'"):
            j.stage_failed_packed([good, too_big])
        with pytest.raises(JournalError, match="'b'"):
            j.stage_failed_packed([good] * 20 + [too_big])  # the column path
        assert j.staged == 0
        later = pack_failed_fields("b", "t2", raw, 2, T0 - 1, "q2", "e2", "tb", T0 + 1)
        j.stage_failed_packed([good, (later, "b", T0 + 1), packed("c", T0 + 2)])
        j.commit()
        assert ids_of(j) == ["c", "b"]  # max_jobs=2: "a" was pruned
        failed, stored = j.get_raw("b")
        assert stored == raw
        assert failed == FailedJob(
            id="b",
            queue="q2",
            job=Job(id="b", name="t2", payload={"k": [1, 2]}, attempts=2, enqueued_at=T0 - 1),
            error="e2",
            failed_at=datetime.fromtimestamp(T0 + 1, UTC),
            traceback="tb",
        )


def packed(id: str, at: float, name: str = "t") -> tuple[bytes, str, float]:
    """A FAILED record as a decoded BATCH carries it: ``(data, id, failed_at)``."""
    return pack_failed_fields(id, name, b"\xa1p", 1, None, "q", "e", "", at), id, at


def test_stage_failed_packed_stores_the_bytes_as_given(jdir: Path) -> None:
    # Packed the long way (attempts as uint64): re-encoding would change these bytes.
    fields = [msgpack.packb(v) for v in ("j", "t", b"\x92\x01\x02")]
    fields += [b"\xcf" + (7).to_bytes(8, "big")]
    fields += [msgpack.packb(v) for v in (None, "q", "e", "tb", T0)]
    data = b"\x99" + b"".join(fields)
    with open_j(jdir) as j:
        j.stage_failed_packed([(data, "j", T0)])
        j.commit()
        (seg,) = segments(jdir)
        assert record_header(RecordType.FAILED, data) + data in seg.read_bytes()
    with open_j(jdir) as j:
        failed, raw = j.get_raw("j")
        assert raw == b"\x92\x01\x02"
        assert (failed.job.payload, failed.job.attempts, failed.traceback) == ([1, 2], 7, "tb")


def test_a_batch_that_prunes_keeps_a_job_failing_again_in_it(jdir: Path) -> None:
    with open_j(jdir, max_jobs=1) as j:
        j.stage_failed_packed([packed("a", T0), packed("b", T0 + 1), packed("a", T0 + 2)])
        j.commit()
        assert ids_of(j) == ["a"]
        assert j.failed_at("a") == T0 + 2
    with open_j(jdir, max_jobs=1) as j:
        assert ids_of(j) == ["a"]
        assert j.failed_at("a") == T0 + 2
    with open_j(jdir, max_jobs=5) as j:  # no prune possible: the batch goes in at once
        j.stage_failed_packed([packed("c", T0 + 3), packed("c", T0 + 4, name="again")])
        j.stage_failed_packed([])
        j.commit()
        assert ids_of(j) == ["c", "a"]
        assert j.get("c").job.name == "again"
        j.stage_removed("c", "forgotten")  # the pending state knows c once, not twice
        with pytest.raises(NotFound):
            j.stage_removed("c", "forgotten")


def test_jobs_failing_again_while_uncounted_are_counted_once(root: Path) -> None:
    # Far below max_jobs a batch is staged without counting (no look-up of its ids in the
    # committed index); near it the pending jobs are counted, re-failures once.
    with open_j(root / "a", max_jobs=5) as j:
        j.stage_failed_packed([packed("a", T0), packed("b", T0 + 1)])
        j.commit()
        j.stage_failed_packed([packed("a", T0 + 2), packed("b", T0 + 3)])  # not counted
        j.stage_failed_packed([packed("c", T0 + 4), packed("d", T0 + 5), packed("e", T0 + 6)])
        j.commit()
        assert ids_of(j) == ["e", "d", "c", "b", "a"]  # 5 jobs: nothing pruned
        j.stage_failed_packed([packed("f", T0 + 7)])
        j.commit()
        assert ids_of(j) == ["f", "e", "d", "c", "b"]  # the oldest, a, made room
    with open_j(root / "b", max_jobs=4) as j:
        j.stage_failed_packed([packed("a", T0), packed("b", T0 + 1)])
        j.commit()
        j.stage_failed_packed([packed("a", T0 + 2)])  # not counted, then committed
        j.commit()
        j.stage_failed_packed([packed("c", T0 + 3), packed("d", T0 + 4)])
        j.stage_failed_packed([packed("e", T0 + 5)])  # 5 jobs: the oldest, b, goes
        j.commit()
        assert ids_of(j) == ["e", "d", "c", "a"]


class StagingIO(FileIO):
    """Real I/O that runs ``during`` inside the next sync: work arriving mid-commit."""

    def __init__(self) -> None:
        self.during: Callable[[], None] | None = None

    def fdatasync(self, fd: int) -> None:
        during, self.during = self.during, None
        if during is not None:
            during()
        super().fdatasync(fd)


def test_failures_staged_during_a_commit_stay_pending(jdir: Path) -> None:
    io = StagingIO()
    with open_j(jdir, io=io) as j:
        j.stage_failed_packed([packed("a", T0), packed("b", T0 + 1)])
        io.during = lambda: j.stage_failed_packed(
            [packed("c", T0 + 2), packed("c", T0 + 3), packed("d", T0 + 4)]
        )
        j.commit()
        assert ids_of(j) == ["b", "a"]  # what that commit wrote, nothing staged meanwhile
        assert j.staged == 3
        assert j.stage_removed("c", "forgotten", if_failed_at=T0 + 2) is False  # c failed again
        j.stage_removed("c", "forgotten")
        with pytest.raises(NotFound):
            j.stage_removed("c", "forgotten")
        j.commit()
        assert ids_of(j) == ["d", "b", "a"]


def test_removals_staged_during_a_commit_stay_pending(jdir: Path) -> None:
    io = StagingIO()
    with open_j(jdir, io=io) as j:
        j.stage_failed_packed([packed("a", T0), packed("b", T0 + 1)])

        def during() -> None:
            j.stage_failed_packed([packed("c", T0 + 2)])
            j.stage_removed("a", "forgotten")  # being committed: live in the pending state

        io.during = during
        j.commit()
        assert ids_of(j) == ["b", "a"]
        with pytest.raises(NotFound):
            j.stage_removed("a", "forgotten")  # its removal is staged
        j.stage_removed("c", "forgotten")
        j.commit()
        assert ids_of(j) == ["b"]


def test_oversized_record_is_refused(jdir: Path) -> None:
    with open_j(jdir) as j:
        with pytest.raises(JournalError, match="exceeds"):
            j.stage_failed(fj(1, payload=b"x" * (64 * 1024 * 1024 + 1)))
        assert j.staged == 0


def test_bad_limits_are_config_errors(jdir: Path) -> None:
    with pytest.raises(ConfigError):
        open_j(jdir, max_jobs=0)
    with pytest.raises(ConfigError):
        open_j(jdir, max_age=0)


def test_a_second_open_of_the_same_directory_is_refused(jdir: Path) -> None:
    with open_j(jdir), pytest.raises(JournalError, match="in use"):
        open_j(jdir)
    with open_j(jdir):
        pass


def test_closed_journal_refuses_work(jdir: Path) -> None:
    j = open_j(jdir)
    j.close()
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.stage_failed(fj(1))
    with pytest.raises(JournalError, match="closed"):
        j.commit()
    with pytest.raises(JournalError, match="closed"):
        j.page(0, 5)


def test_close_commits_what_is_staged(jdir: Path) -> None:
    j = open_j(jdir)
    j.stage_failed(fj(1))
    j.close()
    with open_j(jdir) as j:
        assert ids_of(j) == ["job-1"]


# -- visibility and the pending state ----------------------------------------------------------


def test_only_committed_records_are_visible(jdir: Path) -> None:
    with open_j(jdir) as j:
        j.stage_failed(fj(1))
        assert len(j) == 0
        assert "job-1" not in j
        assert j.page(0, 10) == []
        with pytest.raises(NotFound):
            j.get("job-1")
        j.commit()
        assert ids_of(j) == ["job-1"]
        j.stage_removed("job-1", "forgotten")
        assert ids_of(j) == ["job-1"]  # still there until the removal is durable
        j.commit()
        assert ids_of(j) == []


def test_removal_is_checked_against_committed_plus_staged(jdir: Path) -> None:
    with open_j(jdir) as j:
        with pytest.raises(NotFound):
            j.stage_removed("job-1", "retried")
        j.stage_failed(fj(1))
        j.stage_removed("job-1", "retried")  # staged failure, staged removal: fine
        with pytest.raises(NotFound):
            j.stage_removed("job-1", "forgotten")  # twice: no
        j.stage_failed(fj(2))
        j.commit()
        assert ids_of(j) == ["job-2"]
        j.stage_flush()
        with pytest.raises(NotFound):
            j.stage_removed("job-2", "forgotten")
        j.stage_failed(fj(2))
        j.stage_removed("job-2", "forgotten")
        j.commit()
        assert len(j) == 0
        with pytest.raises(ValueError, match="reason"):
            j.stage_removed("job-2", "pruned")  # type: ignore[arg-type]


def test_a_second_failure_supersedes_the_first(jdir: Path) -> None:
    with open_j(jdir) as j:
        for i in range(3):
            j.stage_failed(fj(i))
        j.commit()
        j.stage_failed(fj(0, error="again", at=T0 + 9))
        j.commit()
        assert ids_of(j) == ["job-0", "job-2", "job-1"]
        assert j.get("job-0").error == "again"
    with open_j(jdir) as j:
        assert ids_of(j) == ["job-0", "job-2", "job-1"]
        assert j.get("job-0").error == "again"


def test_flush_drops_everything_before_it(jdir: Path) -> None:
    with open_j(jdir) as j:
        for i in range(5):
            j.stage_failed(fj(i))
        j.commit()
        j.stage_failed(fj(5))
        j.stage_flush()
        j.stage_failed(fj(6))
        j.commit()
        assert ids_of(j) == ["job-6"]
    with open_j(jdir) as j:
        assert ids_of(j) == ["job-6"]


def test_pages_match_a_model_at_every_depth(jdir: Path) -> None:
    rng = random.Random(7)
    model: dict[str, None] = {}
    with open_j(jdir, max_jobs=10**6) as j:
        for i in range(6000):
            key = f"k{rng.randrange(4000)}"
            j.stage_failed(fj(key, error="e"))
            model.pop(key, None)
            model[key] = None
            if model and rng.random() < 0.45:
                gone = rng.choice(list(model))
                j.stage_removed(gone, "forgotten")
                del model[gone]
            if i % 97 == 0:
                j.commit()
        j.commit()
        newest = list(reversed(model))
        assert len(j) == len(newest)
        for offset in [0, 1, 49, 50, 1023, 1024, 1025, 2000, len(newest) - 50, len(newest) - 1]:
            assert [v.id for v in j.page(offset, 50)] == newest[offset : offset + 50]
        assert j.page(len(newest), 50) == []
        assert j.page(len(newest) + 100, 50) == []
    with open_j(jdir, max_jobs=10**6) as j:
        assert ids_of(j) == newest


# -- failing writes and syncs ------------------------------------------------------------------


class SeamIO(FileIO):
    """Counts every call of the seam; fails fsync when told to."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail_fsync = False

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self.calls["pwrite"] += 1
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self.calls["fsync"] += 1
        if self.fail_fsync:
            raise OSError(errno.EIO, "injected fsync failure")
        super().fsync(fd)


def test_fsio_functions_and_the_journal_share_one_seam(root: Path) -> None:
    io = SeamIO()
    target = root / "state.bin"
    write_atomically(target, b"old", io=io)
    assert io.calls["fsync"] == 2  # the file, then its directory
    fd = os.open(root / "raw", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_all(fd, b"abc", 0, io=io)
    finally:
        os.close(fd)
    assert io.calls["pwrite"] == 1
    fsync_dir(root, io=io)
    assert io.calls["fsync"] == 3
    io.fail_fsync = True
    with pytest.raises(OSError, match="injected"):
        write_atomically(target, b"new", io=io)
    assert target.read_bytes() == b"old"
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    io.fail_fsync = False
    io.calls.clear()
    with open_j(root / "j", io=io) as j:  # the journal's writes go through the same object
        j.stage_failed(fj(1))
        j.commit()
    assert io.calls["pwrite"] >= 2  # the new segment's header, the batch
    assert io.calls["fsync"] >= 1  # the directory, after the segment's rename


class FaultyIO(FileIO):
    """Real I/O, except that chosen calls (1-based, per operation) fail once with EIO."""

    def __init__(self, fail: dict[str, set[int]] | None = None, *, partial: bool = False) -> None:
        self.fail = fail or {}
        self.partial = partial
        self.calls: Counter[str] = Counter()

    def _hit(self, op: str) -> bool:
        self.calls[op] += 1
        return self.calls[op] in self.fail.get(op, set())

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if self._hit("pwrite"):
            if self.partial:
                os.pwrite(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(errno.EIO, "injected write failure")
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        if self._hit("sync"):
            raise OSError(errno.EIO, "injected fsync failure")
        super().fdatasync(fd)

    def truncate(self, fd: int, length: int) -> None:
        if self._hit("truncate"):
            raise OSError(errno.EIO, "injected truncate failure")
        super().truncate(fd, length)


@pytest.mark.parametrize(
    ("op", "partial", "truncate_fails"),
    [
        ("pwrite", False, False),
        ("pwrite", True, False),
        ("sync", False, False),
        ("pwrite", True, True),
        ("sync", False, True),
    ],
)
def test_failed_commits_lose_nothing_and_duplicate_nothing(
    root: Path, op: str, partial: bool, truncate_fails: bool
) -> None:
    for k in range(1, 12):
        jdir = root / f"{op}-{partial}-{truncate_fails}-{k}"
        io = FaultyIO(partial=partial)
        j = open_j(jdir, io=io)
        io.calls.clear()
        io.fail = {op: {k}, "truncate": {1} if truncate_fails else set()}
        acked: set[str] = set()
        staged: set[str] = set()
        failures = 0
        for step in range(14):
            batch = {f"s{step}-{i}" for i in range(3)}
            for jid in sorted(batch):
                j.stage_failed(fj(jid))
            staged |= batch
            try:
                j.commit()
            except JournalError:
                failures += 1
                assert not (batch & set(ids_of(j)))  # nothing of it is visible
            else:
                acked = set(staged)  # re-staged records ride along with later commits
            assert set(ids_of(j)) == acked
            # A crash right now: everything acknowledged is there, nothing unknown.
            image = root / "image"
            shutil.rmtree(image, ignore_errors=True)
            shutil.copytree(jdir, image)
            with open_j(image) as crashed:
                got = ids_of(crashed)
                assert len(got) == len(set(got))
                assert acked <= set(got) <= staged
        assert failures == 1
        io.fail = {}
        j.commit()
        assert set(ids_of(j)) == staged
        j.close()
        with open_j(jdir) as again:
            got = ids_of(again)
            assert sorted(got) == sorted(staged)
            for jid in got:
                assert again.get(jid) == fj(jid)
        shutil.rmtree(jdir)


def test_failed_truncate_moves_to_a_new_segment_and_recovery_cuts_the_old_one(
    jdir: Path,
) -> None:
    io = FaultyIO()
    j = open_j(jdir, io=io)
    j.stage_failed(fj(1))
    j.commit()
    io.calls.clear()
    io.fail = {"sync": {1}, "truncate": {1}}  # the batch is written whole, the sync fails
    j.stage_failed(fj(2))
    with pytest.raises(JournalError, match="fsync"):
        j.commit()
    assert ids_of(j) == ["job-1"]
    io.fail = {}
    j.commit()
    assert ids_of(j) == ["job-2", "job-1"]
    j.close()
    first, _second = segments(jdir)
    with open_j(jdir) as j:
        assert ids_of(j) == ["job-2", "job-1"]
        (cut,) = j.recovery.cuts
        assert cut.file == first
        assert "failed" in cut.reason


def test_failed_rotation_is_retried(jdir: Path) -> None:
    io = FaultyIO()
    j = open_j(jdir, io=io)
    j.stage_failed(fj(1))
    io.calls.clear()
    # commit: sync 1 fails, truncate fails -> next commit rotates; its header sync (2) fails.
    io.fail = {"sync": {1, 2}, "truncate": {1}}
    with pytest.raises(JournalError):
        j.commit()
    with pytest.raises(JournalError):
        j.commit()
    assert not [p for p in jdir.iterdir() if p.name.endswith(".tmp")]
    j.commit()
    assert ids_of(j) == ["job-1"]
    j.close()
    with open_j(jdir) as j:
        assert ids_of(j) == ["job-1"]


# -- retention ---------------------------------------------------------------------------------


def test_retention_by_count_prunes_oldest_first(
    jdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="qdash_mp.journal"), open_j(jdir, max_jobs=5) as j:
        for i in range(8):
            j.stage_failed(fj(i, at=T0 + i))
            j.commit()
        assert ids_of(j) == [f"job-{i}" for i in (7, 6, 5, 4, 3)]
        assert j.pruned_total == 3
        # A batch bigger than the limit: the oldest of it go too, never the newest.
        for i in range(8, 20):
            j.stage_failed(fj(i, at=T0 + i))
        j.commit()
        assert ids_of(j) == [f"job-{i}" for i in (19, 18, 17, 16, 15)]
        assert j.pruned_total == 15
    assert any("pruned 12" in r.getMessage() for r in caplog.records)
    with open_j(jdir, max_jobs=5) as j:
        assert ids_of(j) == [f"job-{i}" for i in (19, 18, 17, 16, 15)]
    with open_j(jdir, max_jobs=2) as j:  # a lower limit applies on open
        assert ids_of(j) == ["job-19", "job-18"]
        assert j.recovery.pruned == 3
        assert j.pruned_total == 3


def test_retention_by_age(jdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0)
    day = 86400.0
    with open_j(jdir, clock=clock, max_age=30 * day) as j:
        for i in range(6):
            j.stage_failed(fj(i, at=T0 + i * day))
        j.commit()
        clock.now = T0 + 32.5 * day  # jobs 0, 1, 2 are older than 30 days
        assert j.enforce_retention() == 3
        assert len(j) == 6  # staged only
        with caplog.at_level(logging.INFO, logger="qdash_mp.journal"):
            j.commit()
        assert ids_of(j) == ["job-5", "job-4", "job-3"]
        assert j.pruned_total == 3
        assert any("pruned 3" in r.getMessage() for r in caplog.records)
        # stage_failed checks the age limit by itself.
        clock.now = T0 + 34.5 * day
        j.stage_failed(fj("fresh", at=clock.now))
        j.commit()
        assert ids_of(j) == ["fresh", "job-5"]
    clock.now = T0 + 36 * day
    with open_j(jdir, clock=clock, max_age=30 * day) as j:
        assert ids_of(j) == ["fresh"]
        assert j.recovery.pruned == 1


def test_retention_skips_jobs_already_gone_in_the_staged_state(jdir: Path) -> None:
    with open_j(jdir, max_jobs=3) as j:
        for i in range(3):
            j.stage_failed(fj(i))
        j.commit()
        j.stage_failed(fj(0, error="again"))  # supersedes the oldest: nothing to prune
        j.stage_failed(fj(3))  # one too many: the oldest live one is job-1, not job-0
        j.commit()
        assert ids_of(j) == ["job-3", "job-0", "job-2"]
        j.stage_removed("job-2", "forgotten")
        j.stage_failed(fj(4))
        j.stage_failed(fj(5))  # prunes job-0 (job-2 is already going)
        j.commit()
        assert ids_of(j) == ["job-5", "job-4", "job-3"]
        assert j.pruned_total == 2


def test_staging_while_a_commit_is_in_flight(jdir: Path) -> None:
    io = CountingIO()
    j = open_j(jdir, io=io, max_jobs=4)
    for i in range(3):
        j.stage_failed(fj(i))
    j.commit()
    io.gate = threading.Event()
    io.entered.clear()
    j.stage_failed(fj(3))
    committer = threading.Thread(target=j.commit)
    committer.start()
    assert io.entered.wait(10)  # job-3 is written, its fsync is held
    j.stage_failed(fj(4))  # five jobs: job-0 is pruned behind the in-flight commit
    j.stage_removed("job-3", "forgotten")  # in flight counts as there
    with pytest.raises(NotFound):
        j.stage_removed("job-3", "forgotten")
    j.stage_flush()
    j.stage_failed(fj(5))
    io.gate.set()
    committer.join(10)
    assert ids_of(j) == ["job-3", "job-2", "job-1", "job-0"]
    with pytest.raises(NotFound):  # the staged flush still counts
        j.stage_removed("job-1", "forgotten")
    j.stage_removed("job-5", "retried")
    j.stage_failed(fj(6))
    j.commit()
    assert ids_of(j) == ["job-6"]
    assert j.pruned_total == 1
    j.close()


def test_age_pruning_stops_at_the_first_young_job(jdir: Path) -> None:
    clock = Clock(T0 + 100)
    with open_j(jdir, clock=clock, max_age=50) as j:
        j.stage_failed(fj("old", at=T0))
        j.stage_failed(fj("young", at=T0 + 90))
        j.stage_failed(fj("old-but-behind", at=T0 + 10))
        j.enforce_retention()
        j.commit()
        assert ids_of(j) == ["old-but-behind", "young"]


# -- group commit ------------------------------------------------------------------------------


class CountingIO(FileIO):
    """Real I/O that counts syncs, and can hold a sync until released."""

    def __init__(self) -> None:
        self.syncs = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_next = False

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EIO, "injected fsync failure")
        super().fdatasync(fd)


async def test_group_commit_shares_fsyncs(jdir: Path) -> None:
    io = CountingIO()
    j = open_j(jdir, io=io)
    group = GroupCommit(j)
    io.syncs = 0

    async def one(i: int) -> None:
        j.stage_failed(fj(i))
        await group.commit()
        assert f"job-{i}" in j  # released only once durable and visible

    await asyncio.gather(*(one(i) for i in range(300)))
    assert len(j) == 300
    assert group.commits <= 3
    assert 1 <= io.syncs <= group.commits
    await group.close()
    j.close()


async def test_group_commit_releases_only_after_the_fsync(jdir: Path) -> None:
    io = CountingIO()
    j = open_j(jdir, io=io)
    group = GroupCommit(j)
    io.gate = threading.Event()
    io.entered.clear()
    for i in range(5):
        j.stage_failed(fj(i))
    waiters = [asyncio.ensure_future(group.commit()) for _ in range(5)]
    await asyncio.get_running_loop().run_in_executor(None, io.entered.wait, 10)
    # The fsync is under way and held: nobody is released, and the loop keeps serving.
    assert not any(w.done() for w in waiters)
    j.stage_failed(fj("late"))
    late = asyncio.ensure_future(group.commit())
    io.gate.set()
    await asyncio.gather(*waiters, late)
    assert set(ids_of(j)) == {f"job-{i}" for i in range(5)} | {"late"}
    await group.close()
    j.close()


async def test_group_commit_failure_reaches_every_waiter_of_that_commit(jdir: Path) -> None:
    io = CountingIO()
    j = open_j(jdir, io=io)
    group = GroupCommit(j, window=0.001)
    io.fail_next = True
    for i in range(4):
        j.stage_failed(fj(i))
    results = await asyncio.gather(*(group.commit() for _ in range(4)), return_exceptions=True)
    assert all(isinstance(r, JournalError) for r in results)
    assert len(j) == 0
    await group.commit()  # the records were staged again: the next commit covers them
    assert len(j) == 4
    await group.close()
    with pytest.raises(JournalError, match="closed"):
        await group.commit()
    j.close()


async def test_cancelled_waiter_does_not_cancel_the_shared_commit(jdir: Path) -> None:
    io = CountingIO()
    j = open_j(jdir, io=io)
    group = GroupCommit(j)
    io.gate = threading.Event()
    io.entered.clear()
    j.stage_failed(fj(1))
    a = asyncio.ensure_future(group.commit())
    b = asyncio.ensure_future(group.commit())
    await asyncio.get_running_loop().run_in_executor(None, io.entered.wait, 10)
    a.cancel()
    io.gate.set()
    await b
    assert a.cancelled()
    assert ids_of(j) == ["job-1"]
    await group.close()
    j.close()


# -- kill -9 -----------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import random, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from qdash_mp.journal import Journal
    from qdash_mp.models import FailedJob, Job

    path, cycle = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(cycle)
    out = sys.stdout
    j = Journal.open(path, segment_bytes=8192, compact_min_bytes=0)
    acked = []
    n = 0
    while True:
        if rng.random() < 0.05:
            j.compact()  # so that some kills land mid-compaction
        if acked and rng.random() < 0.3:
            victim = acked.pop(rng.randrange(len(acked)))
            out.write(f"F {victim}\\n")
            j.stage_removed(victim, "forgotten")
        else:
            ids = [f"c{cycle}-{n + k}" for k in range(rng.randint(1, 8))]
            n += len(ids)
            out.write("B " + " ".join(ids) + "\\n")
            for i in ids:
                j.stage_failed(FailedJob(id=i, queue="q", job=Job(id=i, name="t", payload=[i]),
                                         error="err " + i, failed_at=datetime.now(UTC)))
            acked.extend(ids)
        out.flush()
        j.commit()
        out.write("C\\n")
        out.flush()
    """
)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_record(tmp_path: Path) -> None:
    jdir = tmp_path / "journal"  # a real disk: fsync costs what it costs
    rng = random.Random(99)
    present: set[str] = set()  # acknowledged and not acknowledged-forgotten
    gone: set[str] = set()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for cycle in range(24):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(jdir), str(cycle)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert proc.stdout is not None
        first = ""
        if rng.random() < 0.8:  # mostly while committing, sometimes while starting/recovering
            first = proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.04))
        else:
            time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        # Not communicate(timeout=...): it reads the pipe itself and misses what readline()
        # above had already buffered, e.g. a forget and its "C" (the model then went wrong).
        with proc.stdout:
            rest = proc.stdout.read()
        proc.wait(timeout=30)
        out = first + rest
        assert proc.returncode == -signal.SIGKILL
        unsure_in: set[str] = set()
        unsure_out: set[str] = set()
        lines = out.splitlines()
        for i, line in enumerate(lines):
            if line == "C" or not line:
                continue
            acked = i + 1 < len(lines) and lines[i + 1] == "C"
            kind, _, rest = line.partition(" ")
            if kind == "B":
                (present if acked else unsure_in).update(rest.split())
            elif kind == "F":
                if acked:
                    present.discard(rest)
                    gone.add(rest)
                else:
                    unsure_out.add(rest)
        with open_j(jdir, clock=time.time) as j:
            assert all(jid in j for jid in present - unsure_out), cycle
            assert not any(jid in j for jid in gone), cycle
            mine = {jid for jid in present | unsure_in if jid.startswith(f"c{cycle}-")}
            # An unacknowledged batch is all there or not at all.
            assert all(jid in j for jid in unsure_in) or not any(jid in j for jid in unsure_in)
            for jid in mine:
                if jid in j:
                    assert j.get(jid).error == f"err {jid}"
            newest = j.page(0, len(j))
            assert len({v.id for v in newest}) == len(j)  # each record exactly once
            present = {v.id for v in newest}  # the baseline of the next cycle


def test_remove_if_failed_at_keeps_a_newer_failure(jdir: Path) -> None:
    """A retry must not drop a newer failure of the same job that arrived meanwhile."""
    j = open_j(jdir)
    try:
        j.stage_failed(fj(1, at=T0))
        j.commit()
        seen = j.failed_at("job-1")
        assert seen == T0
        j.stage_failed(fj(1, at=T0 + 7))  # failed again while the retry was in flight
        assert j.stage_removed("job-1", "retried", if_failed_at=seen) is False
        j.commit()
        assert j.failed_at("job-1") == T0 + 7
        assert j.stage_removed("job-1", "retried", if_failed_at=T0 + 7) is True
        j.commit()
        assert "job-1" not in j
        with pytest.raises(NotFound):
            j.failed_at("job-1")
    finally:
        j.close()
