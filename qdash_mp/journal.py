"""The collector's persistent failed-job store: an append-only, checksummed journal.

``Journal`` keeps dead-lettered jobs on disk so that an acknowledged failed job survives
``kill -9`` of the collector, and keeps a small in-memory index so that list pages stay fast
at a million jobs. ``GroupCommit`` lets many asyncio tasks share one fsync.

The byte layout of the files lives in ``qdash_mp.journal_format`` (pure encode/decode/scan);
this module owns the files, the durability rules and the index.

Files (``directory``, the collector passes ``<data-dir>/journal``)::

    lock                        flock()ed while a Journal has the directory open
    NNNNNNNNNN.GGGG.seg         segments: number N, generation G (G > 0: compacted)
    *.seg.tmp                   a segment being created or compacted; deleted on open
    *.seg.cut-<UTC stamp>       bytes cut off a segment on recovery (torn tail), kept
    *.seg.corrupt-<UTC stamp>   copy of a segment salvage skipped damaged bytes in

Durability. ``stage_*`` encode records into one buffer; ``commit()`` appends a COMMIT record,
writes the buffer with one ``pwrite`` and makes it durable with one ``fdatasync`` (group
commit: one fsync covers everything staged). If the write or the sync fails, ``commit()``
raises ``JournalError``; nothing of that commit counts, the segment is truncated back to the
last durable offset (if even that fails, the next commit first starts a new segment whose
header records that offset, and recovery cuts the old segment there), and the records are
staged again in front of anything staged since, so the next good commit makes them durable:
never acknowledged-then-lost, never applied twice.

Visibility. The index (``len``, ``page``, ``get``, ``in``) shows *committed* state only:
nothing appears that a crash could still take away. ``stage_removed`` checks the id against
the *pending* state (committed plus everything staged), so removing a job whose failure is
staged but not yet committed works, and removing one twice raises ``NotFound``.

Recovery (``Journal.open``). Every record of every segment is verified (checksum, length,
type, decode). The last segment may end in a torn tail: records after its last good COMMIT
-- a partial or damaged last batch, or a zero-filled tail -- were never acknowledged, and
are cut after their bytes are copied to a ``.cut-`` side file, with a log line naming file,
offset and byte count. Damage that is followed by a valid COMMIT is not a torn tail: it hit
acknowledged data, and ``open`` refuses with ``JournalCorrupt`` naming the file, the offset
and ``qdash-mp collector --salvage``. With ``salvage=True`` every record that verifies is
kept (resynchronising on the next record that verifies), the skipped ranges are reported in
``recovery.skipped``, the damaged segments are copied to ``.corrupt-`` side files and the
journal is compacted so that it opens cleanly afterwards.

Index. One slot per committed FAILED record in append order, in parallel compact arrays::

    _ids    _Ids               job id (kept when dead, until the arrays are squeezed)
    _alive  bytearray          1 = live
    _loc    array('q')         segment number << 40 | file offset of the record
    _size   array('I')         bytes of the record
    _blocks array('i')         live slots per block of 1024 slots
    _pos    dict[str, int]     job id -> slot

Why this shape: list pages need newest-first access by offset, lookups and removals need
an id -> record map, and both must stay cheap at a million jobs. An insertion-ordered dict
alone gives O(offset) deep pages; a sorted structure costs a Python-level O(log n) per
insert. An append-only slot array with tombstones keeps appends and removals O(1) (a
removal clears ``_alive`` and decrements its block's count) and makes page lookups cheap:
``page(offset, limit)`` walks the block counts from the newest end to the block holding the
offset-th newest live slot (O(n / 1024) integer additions, ~1000 at a million jobs), then
collects ``limit`` slots with C-speed ``bytearray.rfind`` -- deep pages cost the same as
the first. When dead slots outnumber live ones the arrays are squeezed in C-speed passes
(``itertools.compress``) and ``_pos`` rebuilt, so tombstones cost O(1) amortised.

Garbage collection. Apart from ``_ids`` nothing in the index is a container the cyclic GC
tracks (arrays, a bytearray, a dict of str -> int, which the GC untracks). ``_ids`` keeps
its ids in blocks of 1024 sealed as tuples, which the GC untracks too: a flat list of a
million ids would make every full collection visit a million scattered str objects, ~30 ms
at 600k jobs, and a collector decoding batches triggers one every few thousand records.

Nothing else of a job is held in memory: queue, name, attempts, error and failed_at are
read from disk (page cache) when needed -- a page reads its ``limit`` records with
``pread`` and verifies them again, an age check reads the oldest record. That keeps the
index at ~170 bytes per job (mostly the id string and its dict entry) whatever the error
texts are, where an in-memory error preview alone would cost up to ~170 more. ``page``
rows carry the error cut to ``ERROR_PREVIEW`` characters; ``get`` returns the whole record.

Compaction. When dead bytes (removed, superseded, flushed, pruned records, markers) exceed
live bytes and ``compact_min_bytes``, ``maybe_compact`` rewrites the live set: start a new
active segment (``prepare``), copy the live records of every older segment into
``<last>.<gen+1>.seg.tmp`` and fsync it (``write``), rename it into place and fsync the
directory (``rename``), point the index at it (``install``), delete the replaced segments
and fsync the directory (``delete``). A compacted segment replaces every segment ordered
before it, so a crash before the rename leaves the old state (the temp file is deleted on
open) and a crash after it the new one (leftover replaced segments are deleted on open):
never a mix. Commits carry on into the new active segment while the copy runs.

Retention. At most ``max_jobs`` failed jobs (default 1,000,000), none older than
``max_age`` seconds (default 30 days; ``failed_at`` against ``clock()``): beyond that the
oldest, in journal order, are pruned with REMOVED records staged right behind the failure
that pushed them out, so they become durable with it. Staging checks the count every time
and the age at most once a second; ``enforce_retention()`` checks both now, and ``open``
does too. The count is exact where it matters and free where it does not: while the
committed jobs plus everything staged, all taken as new, stay within ``max_jobs``, a batch
is staged without looking its ids up in the committed index (the costliest step of
staging at a million jobs); past that, the live jobs of the pending state are counted
once and then kept up to date. Age is checked from the oldest job forward and stops at
the first one still young. Pruned jobs are counted in ``pruned_total`` (this Journal,
since open) and logged once per commit that pruned any.

Threads. Staging (``stage_*``) and reading (``page``, ``get``) may run on the event loop
thread while ``commit`` runs in a worker thread: one lock guards the staged buffer and the
index, and ``commit`` holds it only to swap the buffer out and to apply what it wrote,
never while writing or syncing. Commits are serialised by a second lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import mmap
import os
import re
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate, chain, compress, islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Final, Literal

import msgpack

from qdash_mp.errors import ConfigError, JournalCorrupt, JournalError, NotFound
from qdash_mp.journal_format import (
    HEADER,
    MAX_PAYLOAD,
    BatchReader,
    FailedFields,
    Op,
    Problem,
    RecordType,
    SegmentHeader,
    append_record,
    commit_record,
    decode_failed,
    encode_client_seq,
    encode_failed,
    encode_removed,
    find_commit,
    flushed_payload,
    frame_records,
    header_size,
    read_header,
    read_record,
    record_header,
    segment_record,
)
from qdash_mp.models import FailedJob, Job, JobView

__all__ = [
    "DEFAULT_COMPACT_MIN_BYTES",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_SEGMENT_BYTES",
    "ERROR_PREVIEW",
    "COMPACTION_STEPS",
    "Cut",
    "FailedRow",
    "FileIO",
    "GroupCommit",
    "Journal",
    "RecoveryReport",
    "Skipped",
]

logger = logging.getLogger("qdash_mp.journal")

DEFAULT_MAX_JOBS: Final = 1_000_000
DEFAULT_MAX_AGE: Final = 30 * 86400.0
DEFAULT_SEGMENT_BYTES: Final = 128 * 1024 * 1024
"""A segment is closed and a new one started once it holds this many bytes."""
DEFAULT_COMPACT_MIN_BYTES: Final = 16 * 1024 * 1024
"""``maybe_compact`` leaves less dead data than this alone."""
ERROR_PREVIEW: Final = 120
"""Characters of the error text a ``page`` row carries."""
COMPACTION_STEPS: Final = ("prepare", "write", "rename", "install", "delete")

_SEG_NAME: Final = re.compile(r"^(\d{10,})\.(\d{4,})\.seg$")
_LOC_SHIFT: Final = 40
_LOC_MASK: Final = (1 << _LOC_SHIFT) - 1
_BLOCK_SHIFT: Final = 10
_BLOCK_MASK: Final = (1 << _BLOCK_SHIFT) - 1
_REBUILD_MIN: Final = 4096
_COMPACT_BATCH: Final = 4096
_COMPACT_CHUNK: Final = 4 * 1024 * 1024

_AGE_CHECK_EVERY: Final = 1.0
"""Seconds between age-retention checks made by ``stage_failed``."""

_FAILED: Final = int(RecordType.FAILED)
_REMOVED: Final = int(RecordType.REMOVED)
_FLUSHED: Final = int(RecordType.FLUSHED)
_CLIENT_SEQ: Final = int(RecordType.CLIENT_SEQ)
FailedRow = tuple[str, str, bytes, int, float | None, str, str, str, float]
"""A failed job as ``stage_failed_rows`` takes it: the wire FAILED array, payload as bytes."""
_BULK: Final = 16
"""``stage_failed_packed`` frames this many records or more in column passes."""
_NOT_FAILED: Final = re.compile(rb"[^\x%02x]" % _FAILED)
"""Finds the next record that is not a FAILED in a string of record type bytes."""
_REMOVED_OR_FLUSHED: Final = re.compile(rb"[\x%02x\x%02x]" % (_REMOVED, _FLUSHED))
_IS_FAILED: Final = bytes(int(b == _FAILED) for b in range(256))
"""``bytes.translate`` table: a string of record types -> 1 where FAILED, else 0."""
_GONE: Final[Op] = (0, "", 0, None)
"""``_p_ids`` value of an id whose staged removal makes it dead in the pending state."""


class _Ids:
    """The job id of every slot, in blocks of ``1 << _BLOCK_SHIFT`` sealed as tuples.

    Full blocks are tuples of str, which the cyclic GC stops tracking after its first look
    at them; only the last block is a list. See "Garbage collection" in the module
    docstring for why the index must not be one big list.
    """

    __slots__ = ("_sealed", "_tail")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._sealed: list[tuple[str, ...]] = []
        self._tail: list[str] = []
        self.extend(ids)

    def __len__(self) -> int:
        return (len(self._sealed) << _BLOCK_SHIFT) + len(self._tail)

    def __getitem__(self, p: int) -> str:
        block = p >> _BLOCK_SHIFT
        if block < len(self._sealed):
            return self._sealed[block][p & _BLOCK_MASK]
        return self._tail[p - (block << _BLOCK_SHIFT)]

    def __iter__(self) -> Iterator[str]:
        return chain(chain.from_iterable(self._sealed), self._tail)

    def extend(self, ids: Iterable[str]) -> None:
        tail = self._tail
        tail += ids
        size = 1 << _BLOCK_SHIFT
        if len(tail) >= size:
            full = len(tail) - len(tail) % size
            self._sealed += [tuple(tail[i : i + size]) for i in range(0, full, size)]
            del tail[:full]


class FileIO:
    """The journal's only writes to the OS: one seam to count or fail them in tests."""

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; returns bytes written (may be short)."""
        return os.pwrite(fd, data, offset)

    def sync(self, fd: int) -> None:
        """Make the file's data durable (``fdatasync``)."""
        os.fdatasync(fd)

    def truncate(self, fd: int, length: int) -> None:
        """Cut the file to ``length`` bytes."""
        os.ftruncate(fd, length)

    def sync_dir(self, path: Path) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class Cut:
    """Bytes cut off a segment on recovery, saved in ``side_file``."""

    file: Path
    offset: int
    length: int
    side_file: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """Damaged bytes salvage skipped (their copy is in the segment's ``.corrupt-`` file)."""

    file: Path
    offset: int
    length: int
    reason: str


@dataclass(slots=True)
class RecoveryReport:
    """What ``Journal.open`` found and did."""

    records: int = 0
    """Data records read (FAILED, REMOVED, FLUSHED, CLIENT_SEQ)."""
    segments: int = 0
    bytes_cut: int = 0
    cuts: list[Cut] = field(default_factory=list)
    side_files: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    removed_files: list[Path] = field(default_factory=list)
    """Temp files and segments replaced by a finished compaction, deleted."""
    pruned: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class _Segment:
    num: int
    gen: int
    path: Path
    fd: int
    end: int
    """Durable length: bytes covered by the last successful sync."""


@dataclass(slots=True)
class _Plan:
    """A compaction in progress (see ``Journal.compact``)."""

    num: int
    gen: int
    replaced: list[_Segment]
    slots: array[int]
    locs: array[int]
    sizes: array[int]
    clients: list[tuple[str, int, float]]
    tmp: Path
    path: Path
    fd: int = -1
    end: int = 0
    new_locs: array[int] = field(default_factory=lambda: array("q"))


class _SimulatedCrash(BaseException):
    """Raised by ``compact(_crash_after=step)``: stop as a crash would, touching nothing."""


def _seg_name(num: int, gen: int) -> str:
    return f"{num:010d}.{gen:04d}.seg"


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _timestamp(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)


def _unpack_payload(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


class Journal:
    """The persistent failed-job store (see the module docstring for the guarantees).

    Keyed by job id: ``FailedJob.id`` is stored, and ``get`` rebuilds the ``Job`` with that
    id (the wire carries only the job id). Not a ``FailedJobs`` by itself: the collector
    wraps it (retry goes through a worker, and removal is staged then committed).
    """

    recovery: RecoveryReport
    client_seqs: dict[str, int]
    """Highest committed batch seq per client id (read single keys; it changes on commit)."""
    pruned_total: int
    """Failed jobs this Journal pruned by retention (count and age), since open."""

    def __init__(
        self,
        directory: Path,
        *,
        max_jobs: int,
        max_age: float,
        clock: Callable[[], float],
        segment_bytes: int,
        compact_min_bytes: int,
        io: FileIO,
    ) -> None:
        """Use ``Journal.open``: this only sets up empty state, without touching files."""
        self.directory = directory
        self.recovery = RecoveryReport()
        self.client_seqs = {}
        self.pruned_total = 0
        self._max_jobs = max_jobs
        self._max_age = max_age
        self._clock = clock
        self._segment_bytes = segment_bytes
        self._compact_min = compact_min_bytes
        self._io = io
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._closed = False
        self._lock_fd = -1
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._must_rotate = False
        self._compacting = False
        self._total_bytes = 0
        self._live_bytes = 0
        self._client_seen: dict[str, float] = {}
        # committed index
        self._ids = _Ids()
        self._alive = bytearray()
        self._loc: array[int] = array("q")
        self._size: array[int] = array("I")
        self._blocks: array[int] = array("i")
        self._pos: dict[str, int] = {}
        self._dead = 0
        # staged records, and the pending state: committed, then everything staged
        self._buf = bytearray()
        self._ops: list[Op] = []
        self._p_ids: dict[str, Op] = {}  # id -> its live staged FAILED op, or _GONE
        self._p_queue: deque[Op] = deque()  # staged FAILED ops, oldest first
        self._p_flushed = False
        self._p_len: int | None = 0  # live jobs in the pending state; None: not counted
        self._p_front = 0
        self._next_age_check = -math.inf

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        salvage: bool = False,
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
        io: FileIO | None = None,
    ) -> Journal:
        """Open (creating if needed) the journal in ``directory`` and recover it.

        ``max_jobs`` / ``max_age`` (seconds) are the retention limits; ``clock`` gives Unix
        seconds. Raises ``JournalCorrupt`` for damage that is not a torn tail (unless
        ``salvage``), ``JournalError`` if the directory is unusable or locked by another
        process, ``ConfigError`` for bad limits.
        """
        if max_jobs < 1:
            raise ConfigError(f"max_jobs must be at least 1, not {max_jobs}")
        if not max_age > 0:
            raise ConfigError(f"max_age must be a positive number of seconds, not {max_age}")
        if segment_bytes < 4096:
            raise ConfigError(f"segment_bytes must be at least 4096, not {segment_bytes}")
        directory = Path(directory)
        journal = cls(
            directory,
            max_jobs=max_jobs,
            max_age=max_age,
            clock=clock,
            segment_bytes=segment_bytes,
            compact_min_bytes=compact_min_bytes,
            io=io if io is not None else FileIO(),
        )
        try:
            journal._lock_directory()
            journal._recover(salvage)
        except OSError as exc:
            journal._abandon()
            raise JournalError(f"cannot open the journal in {directory}: {exc}") from exc
        except BaseException:
            journal._abandon()
            raise
        return journal

    def _lock_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"the journal in {self.directory} is in use by another process"
            ) from None
        self._lock_fd = fd

    def _recover(self, salvage: bool) -> None:
        started = time.perf_counter()
        report = self.recovery
        io = self._io
        found: list[tuple[int, int, Path]] = []
        for name in sorted(os.listdir(self.directory)):
            path = self.directory / name
            if name.endswith(".seg.tmp"):
                path.unlink()
                report.removed_files.append(path)
                logger.info("removed unfinished temp file %s", path)
                continue
            m = _SEG_NAME.match(name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), path))
        found.sort()
        next_num = found[-1][0] + 1 if found else 1

        # A compacted segment replaces every segment ordered before it.
        compacted = [(num, gen) for num, gen, _ in found if gen > 0]
        if compacted:
            top = max(compacted)
            for num, gen, path in found:
                if (num, gen) < top:
                    path.unlink()
                    report.removed_files.append(path)
                    logger.info("removed %s: replaced by compacted segment %s", path, top)
            found = [f for f in found if (f[0], f[1]) >= top]
            io.sync_dir(self.directory)

        segments: list[tuple[_Segment, SegmentHeader | Problem]] = []
        for num, gen, path in found:
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            seg = _Segment(num, gen, path, fd, size)
            self._segments[num] = seg
            head = os.pread(fd, min(size, 4096), 0)
            header = read_header(head, len(head))
            if isinstance(header, SegmentHeader) and (header.num, header.gen) != (num, gen):
                header = Problem(0, f"header says segment {header.num}.{header.gen}")
            segments.append((seg, header))

        # A last segment whose header is damaged with nothing committed after it is a torn
        # creation: cut it whole.
        if segments and isinstance(segments[-1][1], Problem):
            seg, problem = segments[-1]
            assert isinstance(problem, Problem)
            with self._map(seg) as buf:
                torn = find_commit(buf, 0, seg.end) < 0
                if torn:
                    self._cut(seg, buf, 0, problem.reason)
            if torn:
                segments.pop()

        report.segments = len(segments)
        damaged: list[_Segment] = []
        for i, (seg, header) in enumerate(segments):
            nxt = segments[i + 1][1] if i + 1 < len(segments) else None
            self._check_order(seg, header, segments[i - 1][0] if i else None, salvage)
            limit = seg.end
            if isinstance(nxt, SegmentHeader) and (nxt.prev_num, nxt.prev_gen) == (
                seg.num,
                seg.gen,
            ):
                limit = nxt.prev_end
                if seg.end < limit:
                    self._corrupt(
                        salvage,
                        f"{seg.path} is {seg.end} bytes but {limit} of it were durable",
                    )
                    limit = seg.end
            last = nxt is None
            if self._scan(seg, header, limit, last, salvage):
                damaged.append(seg)
            self._maybe_rebuild()  # keep replayed tombstones from piling up
            if limit < seg.end:
                with self._map(seg) as buf:
                    self._cut(seg, buf, limit, "bytes of a commit that failed before it")
        self._total_bytes = sum(s.end for s in self._segments.values())

        if segments:
            self._active = segments[-1][0]
        else:
            self._active = self._create_segment(SegmentHeader(next_num, 0, created_at=self._now()))
            self._segments[self._active.num] = self._active
            self._total_bytes = self._active.end
        self._p_len = None
        report.seconds = time.perf_counter() - started

        if damaged:
            for seg in damaged:
                side = self._side_path(seg.path, "corrupt")
                with self._map(seg) as buf:
                    self._write_side(side, buf[0 : seg.end])
                report.side_files.append(side)
                logger.error("salvage: copied damaged segment %s to %s", seg.path, side)
            self.compact()
        pruned_before = self.pruned_total
        if self.enforce_retention():
            self.commit()
        report.pruned = self.pruned_total - pruned_before
        report.seconds = time.perf_counter() - started
        logger.info(
            "journal %s recovered in %.3fs: %d records in %d segments, %d failed jobs, "
            "%d bytes cut, %d ranges skipped",
            self.directory,
            report.seconds,
            report.records,
            report.segments,
            len(self._pos),
            report.bytes_cut,
            len(report.skipped),
        )

    def _check_order(
        self,
        seg: _Segment,
        header: SegmentHeader | Problem,
        prev: _Segment | None,
        salvage: bool,
    ) -> None:
        """Segments must follow each other without a gap (nobody deleted one)."""
        if not isinstance(header, SegmentHeader) or header.compacted:
            return
        if prev is None:
            if header.prev_num != -1:
                self._corrupt(
                    salvage,
                    f"{seg.path} follows segment {header.prev_num}, which is missing",
                )
        elif header.prev_num != prev.num:
            self._corrupt(
                salvage,
                f"{seg.path} follows segment {header.prev_num}, not {prev.path.name}: "
                "a segment is missing",
            )

    def _corrupt(self, salvage: bool, message: str) -> None:
        if not salvage:
            raise JournalCorrupt(
                f"{message}; the journal will not open over damaged data. Run "
                "`qdash-mp collector --salvage` to keep every record that still verifies."
            )
        logger.error("salvage: %s", message)

    def _scan(
        self,
        seg: _Segment,
        header: SegmentHeader | Problem,
        limit: int,
        last: bool,
        salvage: bool,
    ) -> bool:
        """Read one segment into the index; True if salvage skipped damaged bytes in it."""
        skipped = False
        with self._map(seg) as buf:
            if isinstance(header, Problem):
                reader = BatchReader(buf, 0, limit)
                reader.problem = header
            else:
                reader = BatchReader(buf, header_size(buf), limit)
            try:
                while True:
                    if reader.problem is None:
                        batch = reader.read_batch()
                        if batch is not None:
                            self._apply(seg.num, batch[0], batch[1], replay=True)
                            continue
                        if reader.problem is None:
                            break
                    problem = reader.problem
                    if last and limit == seg.end and find_commit(buf, problem.offset, limit) < 0:
                        self._cut(seg, buf, reader.committed, problem.reason)
                        break
                    if salvage and not last and problem.reason.startswith("records without"):
                        start, ops = reader.take_pending()
                        self._apply(seg.num, start, ops, replay=True)
                        break
                    where = f"{seg.path} at offset {problem.offset}: {problem.reason}"
                    if not salvage:
                        self._corrupt(
                            salvage,
                            f"damaged record in {where}, followed by committed records",
                        )
                    start, ops = reader.take_pending()
                    self._apply(seg.num, start, ops, replay=True)
                    offset, length = reader.resync()
                    skipped = True
                    self.recovery.skipped.append(Skipped(seg.path, offset, length, problem.reason))
                    logger.error(
                        "salvage: skipped %d damaged bytes in %s at offset %d (%s)",
                        length,
                        seg.path,
                        offset,
                        problem.reason,
                    )
            finally:
                self.recovery.records += reader.records
                del reader
        return skipped

    @contextlib.contextmanager
    def _map(self, seg: _Segment) -> Iterator[Any]:
        """The segment's first ``seg.end`` bytes as a read-only buffer."""
        if seg.end == 0:
            yield b""
            return
        mm = mmap.mmap(seg.fd, seg.end, prot=mmap.PROT_READ)
        try:
            yield mm
        finally:
            mm.close()

    def _side_path(self, path: Path, kind: str) -> Path:
        base = f"{path.name}.{kind}-{_stamp()}"
        side = path.with_name(base)
        n = 1
        while side.exists():
            side = path.with_name(f"{base}.{n}")
            n += 1
        return side

    def _write_side(self, side: Path, data: bytes | bytearray) -> None:
        fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._write_all(fd, data, 0)
            self._io.sync(fd)
        finally:
            os.close(fd)
        self._io.sync_dir(self.directory)

    def _cut(self, seg: _Segment, buf: Any, offset: int, reason: str) -> None:
        """Save bytes ``offset..end`` of ``seg`` to a side file, then cut them off.

        A cut at offset 0 (a segment whose very header is torn) removes the file.
        """
        length = seg.end - offset
        side: Path | None = None
        if length > 0:
            side = self._side_path(seg.path, "cut")
            self._write_side(side, buf[offset : seg.end])
        if offset == 0:
            os.close(seg.fd)
            seg.path.unlink()
            self._io.sync_dir(self.directory)
            del self._segments[seg.num]
        elif length > 0:
            self._io.truncate(seg.fd, offset)
            self._io.sync(seg.fd)
        seg.end = offset
        if side is None:
            logger.warning("journal: removed empty segment %s (%s)", seg.path, reason)
            return
        report = self.recovery
        report.cuts.append(Cut(seg.path, offset, length, side, reason))
        report.side_files.append(side)
        report.bytes_cut += length
        logger.warning(
            "journal: cut %d bytes from %s at offset %d (%s); saved to %s",
            length,
            seg.path,
            offset,
            reason,
            side,
        )

    # ------------------------------------------------------------------ staging

    def stage_failed(self, failed: FailedJob, payload_raw: bytes | None = None) -> None:
        """Stage the record of ``failed`` (it supersedes a live record of the same id).

        ``payload_raw`` is the msgpack encoding of the job payload exactly as received;
        without it the payload is packed here. ``JournalError`` if it cannot be encoded.
        """
        job = failed.job
        if payload_raw is None:
            try:
                payload_raw = msgpack.packb(job.payload, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise JournalError(
                    f"the payload of failed job {failed.id!r} is not msgpack-able: {exc}"
                ) from None
        self.stage_failed_fields(
            failed.id,
            job.name,
            payload_raw,
            job.attempts,
            job.enqueued_at,
            failed.queue,
            failed.error,
            failed.traceback,
            _timestamp(failed.failed_at),
        )

    def stage_failed_fields(
        self,
        id: str,
        name: str,
        payload_raw: bytes,
        attempts: int,
        enqueued_at: float | None,
        queue: str,
        error: str,
        traceback: str,
        failed_at: float,
    ) -> None:
        """``stage_failed`` from the wire FAILED fields, without building a ``FailedJob``.

        ``payload_raw`` is the msgpack encoding of the payload (stored verbatim);
        ``failed_at`` and ``enqueued_at`` are Unix seconds. ``JournalError`` if a field
        breaks the FAILED rules (``protocol.check_failed``) or the record is too big; then
        nothing is staged.
        """
        self.stage_failed_rows(
            [(id, name, payload_raw, attempts, enqueued_at, queue, error, traceback, failed_at)]
        )

    def stage_failed_rows(self, rows: Iterable[FailedRow]) -> None:
        """Stage many failures at once, from their fields.

        Each row is the wire FAILED array with the payload as its msgpack bytes:
        ``(id, name, payload_raw, attempts, enqueued_at, queue, error, traceback,
        failed_at)``. All or nothing: if one row cannot be encoded, ``JournalError`` and
        none is staged.
        """
        packed: list[tuple[bytes, str, float]] = []
        for row in rows:
            id, name, payload_raw, attempts, enqueued_at, queue, error, traceback, fat = row
            try:
                if type(fat) is not float:
                    fat = float(fat)
                if enqueued_at is not None and type(enqueued_at) is not float:
                    enqueued_at = float(enqueued_at)
                if type(payload_raw) is not bytes:
                    payload_raw = bytes(memoryview(payload_raw))
                data = encode_failed(
                    id, name, payload_raw, attempts, enqueued_at, queue, error, traceback, fat
                )
            except (TypeError, ValueError, OverflowError) as exc:
                raise JournalError(f"cannot record failed job {id!r}: {exc}") from None
            packed.append((data, id, fat))
        self.stage_failed_packed(packed)

    def stage_failed_packed(self, records: Iterable[tuple[bytes, str, float]]) -> None:
        """Stage FAILED records that are already packed and checked: the collector's path.

        Each record is ``(data, id, failed_at)``: ``data`` the msgpack bytes of a FAILED
        array that passed ``protocol.check_failed`` -- what a decoded ``Batch`` carries
        (each a ``protocol.PackedFailed``) -- and ``id``, ``failed_at`` its fields 0 and 8. The
        bytes are stored as they are; only the record framing (length, type, one CRC) is
        added. A failure in ``data`` would only show at recovery, as a damaged record: pass
        nothing unchecked. All or nothing: a record over ``MAX_PAYLOAD`` bytes raises
        ``JournalError`` and none is staged.
        """
        records = list(records)
        if len(records) < _BULK:  # a few: the column passes below cost more than they save
            chunk = bytearray()
            ops: list[Op] = []
            ids = []
            for data, id, failed_at in records:
                try:
                    head = record_header(_FAILED, data)
                except ValueError as exc:
                    raise JournalError(f"cannot record failed job {id!r}: {exc}") from None
                chunk += head
                chunk += data
                ops.append((_FAILED, id, len(head) + len(data), failed_at))
                ids.append(id)
        else:
            datas = list(map(itemgetter(0), records))
            ids = list(map(itemgetter(1), records))
            failed_ats = list(map(itemgetter(2), records))
            try:
                chunk = frame_records(_FAILED, datas)
            except ValueError as exc:
                big = next(r for r in records if len(r[0]) > MAX_PAYLOAD)
                raise JournalError(f"cannot record failed job {big[1]!r}: {exc}") from None
            sizes = [HEADER.size + n for n in map(len, datas)]
            ops = list(zip(repeat(_FAILED), ids, sizes, failed_ats, strict=False))
        if not ops:
            return
        with self._lock:
            self._check_open()
            touched = self._p_ids
            queue = self._p_queue
            committed = 0 if self._p_flushed else len(self._pos)
            if committed + len(queue) + len(ops) <= self._max_jobs:
                # Even if every id were new, max_jobs could not be reached (the usual case):
                # no need to count, nor to look the ids up in the (big) committed index.
                self._p_len = None
                self._buf += chunk
                self._ops += ops
                touched.update(zip(ids, ops, strict=False))  # (same length) a later one supersedes
                queue += ops
            else:
                before = len(touched)
                p_len = self._pending_len()
                if p_len + len(ops) > self._max_jobs:
                    self._stage_pruning(chunk, ops)
                elif touched.keys().isdisjoint(ids) and (
                    self._p_flushed or self._pos.keys().isdisjoint(ids)
                ):
                    # Every id is new to the pending state: all in C passes.
                    self._buf += chunk
                    self._ops += ops
                    touched.update(zip(ids, ops, strict=False))  # same length
                    queue += ops
                    self._p_len = p_len + len(touched) - before  # a repeat supersedes
                else:
                    self._stage_pruning(chunk, ops)  # record by record; it prunes nothing
            now = self._clock()
            if now >= self._next_age_check:
                self._next_age_check = now + _AGE_CHECK_EVERY
                self._prune_age(now)

    def _stage_pruning(self, chunk: bytearray, ops: list[Op]) -> None:
        """Stage framed FAILED records one by one, each count prune right behind the
        failure that caused it (lock held): a later record of the same id in the same
        batch must come after the prune of its earlier one.
        """
        buf = self._buf
        touched = self._p_ids
        queue = self._p_queue
        pos = self._pos
        p_len = self._pending_len()
        off = 0
        with memoryview(chunk) as view:
            for op in ops:
                size = op[2]
                buf += view[off : off + size]
                off += size
                self._ops.append(op)
                id = op[1]
                prev = touched.get(id)
                if prev is None:
                    if self._p_flushed or id not in pos:
                        p_len += 1
                elif prev is _GONE:
                    p_len += 1
                touched[id] = op
                queue.append(op)
                if p_len > self._max_jobs:
                    self._p_len = p_len
                    self._prune_count()
                    p_len = self._pending_len()
        self._p_len = p_len

    def stage_removed(
        self,
        id: str,
        reason: Literal["retried", "forgotten"],
        *,
        if_failed_at: float | None = None,
    ) -> bool:
        """Stage dropping the record of ``id``; returns whether it did.

        ``NotFound`` if it is not there in the pending state (committed plus staged), so a
        job whose failure is staged can be removed, and a job cannot be removed twice. With
        ``if_failed_at`` the record is dropped only if it is still the failure of that time:
        a retry must not drop a newer failure of the same job that arrived meanwhile
        (returns False then, staging nothing).
        """
        if reason not in ("retried", "forgotten"):
            raise ValueError(f"reason must be 'retried' or 'forgotten', not {reason!r}")
        with self._lock:
            self._check_open()
            if not self._p_live(id):
                raise NotFound(id)
            if if_failed_at is not None and self._p_failed_at(id) != if_failed_at:
                return False
            self._stage_removed(id, reason, reason)
            return True

    def _p_failed_at(self, id: str) -> float:
        """``failed_at`` of the live record of ``id`` in the pending state (lock held)."""
        op = self._p_ids.get(id)
        if op is not None:
            failed_at: float = op[3]
            return failed_at
        return self._read(self._pos[id]).failed_at

    def stage_flush(self) -> None:
        """Stage dropping every failed job."""
        with self._lock:
            self._check_open()
            size = self._append(_FLUSHED, flushed_payload())
            self._ops.append((_FLUSHED, "", size, None))
            self._p_ids.clear()
            self._p_queue.clear()
            self._p_flushed = True
            self._p_len = 0
            self._p_front = len(self._alive)

    def stage_client_seq(self, client_id: str, seq: int) -> None:
        """Stage ``seq`` as the highest batch of ``client_id`` applied (dedup state)."""
        if type(client_id) is not str or not client_id:
            raise ValueError("client_id must be a non-empty str")
        if type(seq) is not int or seq < 0:
            raise ValueError(f"seq must be a non-negative int, not {seq!r}")
        at = float(self._clock())
        try:
            payload = encode_client_seq(client_id, seq, at)
        except (ValueError, OverflowError) as exc:
            raise JournalError(f"cannot record the seq of client {client_id!r}: {exc}") from None
        with self._lock:
            self._check_open()
            size = self._append(_CLIENT_SEQ, payload)
            self._ops.append((_CLIENT_SEQ, client_id, size, (seq, at)))

    def enforce_retention(self) -> int:
        """Stage prunes for the count and age limits now; returns how many were staged.

        ``stage_failed`` does this by itself (the age limit at most once a second); call
        it (then ``commit``) now and then so that jobs also expire while no new failures
        arrive.
        """
        with self._lock:
            self._check_open()
            before = len(self._ops)
            self._prune_count()
            now = self._clock()
            self._next_age_check = now + _AGE_CHECK_EVERY
            self._prune_age(now)
            return len(self._ops) - before

    @property
    def staged(self) -> int:
        """Records staged and not yet committed."""
        return len(self._ops)

    def _append(self, rtype: int, payload: bytes) -> int:
        try:
            return append_record(self._buf, rtype, payload)
        except ValueError as exc:
            raise JournalError(str(exc)) from None

    def _stage_removed(self, id: str, reason: str, detail: str) -> None:
        size = self._append(_REMOVED, encode_removed(id, reason))
        self._ops.append((_REMOVED, id, size, detail))
        self._p_ids[id] = _GONE
        if self._p_len is not None:
            self._p_len -= 1

    def _p_live(self, id: str) -> bool:
        """Is ``id`` live in the pending state (committed, then everything staged)?"""
        op = self._p_ids.get(id)
        if op is not None:
            return op is not _GONE
        return not self._p_flushed and id in self._pos

    def _pending_len(self) -> int:
        """Live jobs in the pending state (lock held), counted now if they were not."""
        if self._p_len is None:
            pos = self._pos
            touched = self._p_ids
            if self._p_flushed:
                n = sum(1 for op in touched.values() if op is not _GONE)
            else:  # a staged id replaces its committed state
                n = len(pos)
                for id, op in touched.items():
                    n += (op is not _GONE) - (id in pos)
            self._p_len = n
        return self._p_len

    def _prune_count(self) -> None:
        while self._pending_len() > self._max_jobs:
            oldest = self._p_oldest()
            if oldest is None:  # pragma: no cover - p_len > 0 implies a live job
                return
            self._stage_removed(oldest[0], "pruned", "pruned:count")

    def _prune_age(self, now: float) -> None:
        cutoff = now - self._max_age
        while True:
            oldest = self._p_oldest()
            if oldest is None:
                return
            key, slot, op = oldest
            failed_at = op[3] if slot < 0 else self._read(slot).failed_at
            if failed_at >= cutoff:
                return
            self._stage_removed(key, "pruned", "pruned:age")

    def _p_oldest(self) -> tuple[str, int, Op] | None:
        """The oldest job live in the pending state: ``(id, slot, _GONE)`` if committed,
        ``(id, -1, op)`` if staged.

        Amortised O(1): being dead in the pending state is permanent for a slot (and for a
        staged record), so both cursors only move forward.
        """
        if not self._p_flushed:
            alive = self._alive
            ids = self._ids
            touched = self._p_ids
            p = self._p_front
            while True:
                p = alive.find(1, p)
                if p < 0:
                    break
                key = ids[p]
                if key not in touched:
                    self._p_front = p
                    return key, p, _GONE
                p += 1
            self._p_front = len(alive)
        # Every committed job is dead in the pending state: the oldest is a staged one.
        queue = self._p_queue
        touched = self._p_ids
        while queue:
            op = queue[0]
            if touched.get(op[1]) is op:
                return op[1], -1, op
            queue.popleft()
        return None

    # ------------------------------------------------------------------ committing

    def commit(self) -> None:
        """Write and fsync everything staged (one write, one sync); then it is visible.

        ``JournalError`` if that failed: nothing of it is durable or visible, and it stays
        staged (in front of anything staged meanwhile) for the next commit.
        """
        with self._commit_lock:
            self._commit_locked()

    def _commit_locked(self) -> None:
        with self._lock:
            self._check_open()
            if not self._ops:
                return
            buf, ops = self._buf, self._ops
            self._buf, self._ops = bytearray(), []
        data_len = len(buf)
        seg: _Segment | None = None
        try:
            if self._must_rotate:
                self._rotate("the previous segment could not be cut back after a failed write")
            seg = self._active
            assert seg is not None
            start = seg.end
            buf += commit_record(start, len(ops))
            self._write_all(seg.fd, buf, start)
            self._io.sync(seg.fd)
        except BaseException as exc:
            # Whatever went wrong, the batch is not durable: stage it again, in front. A copy,
            # not a resize: the failed write's traceback may still hold views of buf.
            restaged = buf[:data_len]
            if seg is not None:
                self._undo_write(seg)
            with self._lock:
                self._buf = restaged + self._buf
                self._ops = ops + self._ops
            if isinstance(exc, OSError):
                raise JournalError(f"journal commit failed: {exc}") from exc
            raise
        seg.end = start + len(buf)
        self._total_bytes += len(buf)
        with self._lock:
            pruned = self._apply(seg.num, start, ops, replay=False)
            self._refresh_pending()
            self._maybe_rebuild()
        if pruned:
            logger.info(
                "retention pruned %d failed job(s) (limits: %d jobs, %g s); %d pruned so far",
                pruned,
                self._max_jobs,
                self._max_age,
                self.pruned_total,
            )
        if seg.end >= self._segment_bytes:
            try:
                self._rotate("the segment is full")
            except OSError as exc:
                logger.warning("could not start a new journal segment: %s", exc)

    def _write_all(self, fd: int, data: bytes | bytearray, offset: int) -> None:
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                n = self._io.pwrite(fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError("write made no progress")
                done += n

    def _undo_write(self, seg: _Segment) -> None:
        """Cut ``seg`` back to its durable end after a failed write or sync."""
        try:
            self._io.truncate(seg.fd, seg.end)
            self._io.sync(seg.fd)
        except OSError as exc:
            self._must_rotate = True
            logger.error(
                "could not cut %s back to %d bytes after a failed commit (%s); "
                "the next commit starts a new segment",
                seg.path,
                seg.end,
                exc,
            )

    def _rotate(self, why: str) -> None:
        """Start the next segment; its header records how much of this one is durable."""
        old = self._active
        assert old is not None
        header = SegmentHeader(old.num + 1, 0, old.num, old.gen, old.end, self._now())
        new = self._create_segment(header)
        with self._lock:
            self._segments[new.num] = new
            self._active = new
        self._must_rotate = False
        self._total_bytes += new.end
        logger.info("journal: started segment %s (%s)", new.path.name, why)

    def _create_segment(self, header: SegmentHeader) -> _Segment:
        """A new segment file holding only its header, made durable under its final name."""
        path = self.directory / _seg_name(header.num, header.gen)
        tmp = path.with_name(path.name + ".tmp")
        data = segment_record(header)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write_all(fd, data, 0)
            self._io.sync(fd)
            os.rename(tmp, path)
            self._io.sync_dir(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return _Segment(header.num, header.gen, path, fd, len(data))

    def _now(self) -> float:
        return float(self._clock())

    # ------------------------------------------------------------------ the index

    def _apply(self, num: int, start: int, ops: Iterable[Op], *, replay: bool) -> int:
        """Apply written records to the index; returns how many were retention prunes."""
        ops = ops if isinstance(ops, list) else list(ops)
        # Runs of FAILED records (a batch's failed jobs) go in a few C-level passes; the
        # other records, one by one.
        kinds = bytes(map(itemgetter(0), ops))
        not_failed = _NOT_FAILED.search
        pos = self._pos
        kill = self._kill
        base = num << _LOC_SHIFT
        off = start
        pruned = 0
        i = 0
        n = len(ops)
        while i < n:
            rtype, key, size, extra = ops[i]
            if rtype == _FAILED:
                m = not_failed(kinds, i)
                j = n if m is None else m.start()
                off = self._append_failed(base, off, ops[i:j])
                i = j
                continue
            if rtype == _REMOVED:
                p = pos.pop(key, None)
                if p is not None:
                    kill(p)
                if not replay and extra.startswith("pruned"):
                    pruned += 1
            elif rtype == _FLUSHED:
                self._kill_all()
            elif rtype == _CLIENT_SEQ:
                seq, at = extra
                if seq > self.client_seqs.get(key, -1):
                    self.client_seqs[key] = seq
                if at > self._client_seen.get(key, -math.inf):
                    self._client_seen[key] = at
            off += size
            i += 1
        self.pruned_total += pruned
        return pruned

    def _append_failed(self, base: int, off: int, run: list[Op]) -> int:
        """Give each FAILED record of ``run`` (written back to back from ``off``) a new slot,
        superseding the live record of its id; returns the offset after the run.
        """
        keys: list[str] = list(map(itemgetter(1), run))
        sizes: list[int] = list(map(itemgetter(2), run))
        k = len(run)
        p0 = len(self._ids)
        self._ids.extend(keys)
        self._alive += b"\x01" * k
        self._loc.extend(islice(accumulate(sizes, initial=base + off), k))
        self._size.extend(sizes)
        blocks = self._blocks
        p, stop = p0, p0 + k
        while p < stop:  # live slots per block of 1 << _BLOCK_SHIFT
            upto = min(stop, ((p >> _BLOCK_SHIFT) + 1) << _BLOCK_SHIFT)
            if p & _BLOCK_MASK:
                blocks[p >> _BLOCK_SHIFT] += upto - p
            else:
                blocks.append(upto - p)
            p = upto
        total = sum(sizes)
        self._live_bytes += total
        # One probe per id: setdefault returns the slot of a live record of the same id,
        # which the new one supersedes (an earlier record of this very run included).
        slots = range(p0, stop)
        found = list(map(self._pos.setdefault, keys, slots))
        if found != list(slots):
            pos = self._pos
            for key, new, old in zip(keys, slots, found, strict=True):
                if old != new:
                    self._kill(pos[key])
                    pos[key] = new
        return off + total

    def _kill(self, p: int) -> None:
        self._alive[p] = 0
        self._blocks[p >> _BLOCK_SHIFT] -= 1
        self._live_bytes -= self._size[p]
        self._dead += 1

    def _kill_all(self) -> None:
        self._pos.clear()
        self._live_bytes = 0
        n = len(self._ids)
        if self._compacting:  # slots must keep their numbers until the compaction installs
            self._alive[:] = bytes(n)
            self._blocks[:] = array("i", bytes(4 * len(self._blocks)))
            self._dead = n
            return
        self._ids = _Ids()
        del self._alive[:], self._loc[:], self._size[:]
        del self._blocks[:]
        self._dead = 0
        self._p_front = 0

    def _maybe_rebuild(self) -> None:
        """Squeeze dead slots out of the arrays once they outnumber live ones."""
        if self._compacting or self._dead <= max(_REBUILD_MIN, len(self._pos)):
            return
        keep = bytes(self._alive)
        self._ids = _Ids(compress(self._ids, keep))
        self._loc = array("q", compress(self._loc, keep))
        self._size = array("I", compress(self._size, keep))
        n = len(self._ids)
        self._alive = bytearray(b"\x01") * n
        full, rest = divmod(n, 1 << _BLOCK_SHIFT)
        self._blocks = array("i", repeat(1 << _BLOCK_SHIFT, full))
        if rest:
            self._blocks.append(rest)
        self._pos = dict(zip(self._ids, range(n), strict=True))
        self._dead = 0
        self._p_front = 0

    def _refresh_pending(self) -> None:
        """Re-derive the pending overlay from what is still staged (after a commit)."""
        ops = self._ops
        kinds = bytes(map(itemgetter(0), ops))
        if _REMOVED_OR_FLUSHED.search(kinds) is None:
            # Only failures (and client seqs) staged, the usual case: in C-level passes.
            failed = list(compress(ops, kinds.translate(_IS_FAILED)))
            self._p_ids = dict(zip(map(itemgetter(1), failed), failed, strict=True))
            self._p_queue = deque(failed)
            self._p_flushed = False
            return
        touched: dict[str, Op] = {}
        queue: deque[Op] = deque()
        flushed = False
        for op in self._ops:
            rtype = op[0]
            if rtype == _FAILED:
                touched[op[1]] = op
                queue.append(op)
            elif rtype == _REMOVED:
                touched[op[1]] = _GONE
            elif rtype == _FLUSHED:
                touched.clear()
                queue.clear()
                flushed = True
        self._p_ids = touched
        self._p_queue = queue
        self._p_flushed = flushed
        if flushed:
            self._p_front = len(self._alive)

    def _newest_slots(self, offset: int, limit: int) -> list[int]:
        """Slots of the live jobs ``offset .. offset+limit`` counted from the newest."""
        blocks = self._blocks
        alive = self._alive
        b = len(blocks) - 1
        skip = offset
        while b >= 0 and blocks[b] <= skip:
            skip -= blocks[b]
            b -= 1
        if b < 0:
            return []
        lo = b << _BLOCK_SHIFT
        p = min(lo + (1 << _BLOCK_SHIFT), len(alive))
        for _ in range(skip + 1):
            p = alive.rfind(1, lo, p)
        slots = [p]
        while len(slots) < limit:
            p = alive.rfind(1, 0, p)
            if p < 0:
                break
            slots.append(p)
        return slots

    def _read(self, p: int) -> FailedFields:
        """The FAILED record in slot ``p``, read from disk and verified again."""
        loc = self._loc[p]
        seg = self._segments[loc >> _LOC_SHIFT]
        off = loc & _LOC_MASK
        size = self._size[p]
        try:
            data = os.pread(seg.fd, size, off)
        except OSError as exc:
            raise JournalError(f"cannot read {seg.path} at offset {off}: {exc}") from exc
        rec = read_record(data, 0, len(data))
        why = ""
        if isinstance(rec, Problem):
            why = rec.reason
        elif rec[0] != _FAILED or rec[1] != size:
            why = "not the FAILED record the index expects"
        else:
            try:
                fields = decode_failed(rec[2])
            except ValueError as exc:
                why = str(exc)
            else:
                if fields.id == self._ids[p]:
                    return fields
                why = "record of another job"
        raise JournalCorrupt(
            f"{seg.path} at offset {off}: a stored record no longer verifies ({why}); "
            "restart with `qdash-mp collector --salvage` to keep every record that does"
        )

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, id: object) -> bool:
        return id in self._pos

    def page(self, offset: int, limit: int) -> list[JobView]:
        """Up to ``limit`` committed failed jobs, newest first, skipping ``offset``."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        if limit == 0:
            return []
        with self._lock:
            self._check_open()
            rows = []
            for p in self._newest_slots(offset, limit):
                f = self._read(p)
                rows.append(
                    JobView(
                        id=f.id,
                        queue=f.queue,
                        name=f.name,
                        error=f.error[:ERROR_PREVIEW],
                        attempts=f.attempts,
                        failed_at=datetime.fromtimestamp(f.failed_at, UTC),
                    )
                )
            return rows

    def get(self, id: str) -> FailedJob:
        """The whole committed record of ``id``, read from disk; ``NotFound`` if absent."""
        return self.get_raw(id)[0]

    def failed_at(self, id: str) -> float:
        """The exact ``failed_at`` (Unix seconds) of the committed record of ``id``.

        What ``stage_removed(..., if_failed_at=)`` compares against; ``NotFound`` if absent.
        """
        with self._lock:
            self._check_open()
            p = self._pos.get(id)
            if p is None:
                raise NotFound(id)
            return self._read(p).failed_at

    def get_raw(self, id: str) -> tuple[FailedJob, bytes]:
        """``get`` plus the payload's msgpack bytes exactly as stored (for a retry)."""
        with self._lock:
            self._check_open()
            p = self._pos.get(id)
            if p is None:
                raise NotFound(id)
            f = self._read(p)
        try:
            payload = _unpack_payload(f.payload_raw)
        except (ValueError, TypeError) as exc:
            raise JournalError(f"the stored payload of job {id!r} does not decode: {exc}") from None
        job = Job(
            id=f.id,
            name=f.name,
            payload=payload,
            attempts=f.attempts,
            enqueued_at=f.enqueued_at,
        )
        failed = FailedJob(
            id=f.id,
            queue=f.queue,
            job=job,
            error=f.error,
            failed_at=datetime.fromtimestamp(f.failed_at, UTC),
            traceback=f.traceback,
        )
        return failed, f.payload_raw

    @property
    def live_bytes(self) -> int:
        """Bytes of the live FAILED records."""
        return self._live_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of every segment."""
        return self._total_bytes

    # ------------------------------------------------------------------ compaction

    def maybe_compact(self) -> bool:
        """Compact if dead bytes exceed live bytes and ``compact_min_bytes``; True if it did.

        Blocking (it copies the live set): call it from a worker thread now and then.
        """
        dead = self._total_bytes - self._live_bytes
        if dead <= self._live_bytes or dead < self._compact_min:
            return False
        if self._compact_lock.locked():  # one is running already
            return False
        self.compact()
        return True

    def compact(self, *, _crash_after: str | None = None) -> None:
        """Rewrite the live set into one segment and delete the segments it replaces.

        Commits continue into the new active segment meanwhile. ``JournalError`` if it
        failed (the journal stays as it was). ``_crash_after`` (tests) stops right after
        the named step of ``COMPACTION_STEPS`` as if the process died there.
        """
        with self._compact_lock:
            plan = self._compact_prepare()
            self._crash_point("prepare", _crash_after)
            try:
                self._compact_write(plan)
                self._crash_point("write", _crash_after)
                self._compact_rename(plan)
                self._crash_point("rename", _crash_after)
            except OSError as exc:
                self._compact_abort(plan)
                raise JournalError(f"journal compaction failed: {exc}") from exc
            except _SimulatedCrash:
                raise
            except BaseException:
                self._compact_abort(plan)
                raise
            self._compact_install(plan)
            self._crash_point("install", _crash_after)
            self._compact_delete(plan)
            self._crash_point("delete", _crash_after)

    @staticmethod
    def _crash_point(step: str, crash_after: str | None) -> None:
        if crash_after == step:
            raise _SimulatedCrash(step)

    def _compact_prepare(self) -> _Plan:
        """Start a new active segment and snapshot the live set of all older ones."""
        with self._commit_lock:
            self._check_open()
            old = self._active
            assert old is not None
            try:
                self._rotate("compaction")
            except OSError as exc:
                raise JournalError(f"journal compaction failed: {exc}") from exc
            with self._lock:
                n = len(self._alive)
                slots = array("q", compress(range(n), self._alive))
                loc = self._loc
                size = self._size
                locs = array("q", [loc[p] for p in slots])
                sizes = array("I", [size[p] for p in slots])
                horizon = self._now() - self._max_age
                clients = [
                    (c, s, self._client_seen.get(c, 0.0))
                    for c, s in self.client_seqs.items()
                    if self._client_seen.get(c, 0.0) >= horizon
                ]
                replaced = [s for s in self._segments.values() if s.num <= old.num]
                self._compacting = True
        gen = old.gen + 1
        path = self.directory / _seg_name(old.num, gen)
        return _Plan(
            num=old.num,
            gen=gen,
            replaced=replaced,
            slots=slots,
            locs=locs,
            sizes=sizes,
            clients=clients,
            tmp=path.with_name(path.name + ".tmp"),
            path=path,
        )

    def _compact_write(self, plan: _Plan) -> None:
        """Copy the snapshot's records (verified again) into the temp file; fsync it."""
        segs = {s.num: s for s in plan.replaced}
        with contextlib.suppress(FileNotFoundError):
            plan.tmp.unlink()
        fd = os.open(plan.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        plan.fd = fd
        out = bytearray(segment_record(SegmentHeader(plan.num, plan.gen, created_at=self._now())))
        written = 0
        batch_start = len(out)
        count = 0
        base = plan.num << _LOC_SHIFT
        new_locs = plan.new_locs
        chunk = b""
        chunk_num = -1
        chunk_off = 0

        def close_batch() -> None:
            nonlocal written, batch_start, count, out
            out += commit_record(batch_start, count)
            self._write_all(fd, out, written)
            written += len(out)
            out = bytearray()
            batch_start = written
            count = 0

        for loc, size in zip(plan.locs, plan.sizes, strict=True):
            num = loc >> _LOC_SHIFT
            off = loc & _LOC_MASK
            rel = off - chunk_off
            if num != chunk_num or rel < 0 or rel + size > len(chunk):
                seg = segs[num]
                chunk = os.pread(seg.fd, max(size, min(_COMPACT_CHUNK, seg.end - off)), off)
                chunk_num, chunk_off, rel = num, off, 0
            rec = read_record(chunk, rel, rel + size)
            if isinstance(rec, Problem) or rec[0] != _FAILED or rec[1] != size:
                raise JournalCorrupt(
                    f"{segs[num].path} at offset {off}: a stored record no longer verifies; "
                    "restart with `qdash-mp collector --salvage`"
                )
            new_locs.append(base + written + len(out))
            out += chunk[rel : rel + size]
            count += 1
            if count >= _COMPACT_BATCH or len(out) >= _COMPACT_CHUNK:
                close_batch()
        for client_id, seq, at in plan.clients:
            append_record(out, _CLIENT_SEQ, encode_client_seq(client_id, seq, at))
            count += 1
        if count:
            close_batch()
        elif out:
            self._write_all(fd, out, written)
            written += len(out)
        self._io.sync(fd)
        plan.end = written

    def _compact_rename(self, plan: _Plan) -> None:
        """Put the compacted segment in place: from here recovery sees the new state."""
        os.rename(plan.tmp, plan.path)
        self._io.sync_dir(self.directory)

    def _compact_install(self, plan: _Plan) -> None:
        """Point the index at the compacted segment and stop reading the replaced ones."""
        with self._lock:
            alive = self._alive
            loc = self._loc
            for p, new in zip(plan.slots, plan.new_locs, strict=True):
                if alive[p]:
                    loc[p] = new
            for seg in plan.replaced:
                if self._segments.get(seg.num) is seg:
                    del self._segments[seg.num]
                os.close(seg.fd)
                self._total_bytes -= seg.end
            self._segments[plan.num] = _Segment(plan.num, plan.gen, plan.path, plan.fd, plan.end)
            self._total_bytes += plan.end
            self._compacting = False
            self._maybe_rebuild()
        logger.info(
            "journal compacted: %d live records in %s replace %d segment(s)",
            len(plan.slots),
            plan.path.name,
            len(plan.replaced),
        )

    def _compact_delete(self, plan: _Plan) -> None:
        """Delete the replaced segments (recovery would, if this does not finish)."""
        try:
            for seg in plan.replaced:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
            self._io.sync_dir(self.directory)
        except OSError as exc:
            logger.warning("could not delete replaced journal segments: %s", exc)

    def _compact_abort(self, plan: _Plan) -> None:
        if plan.fd >= 0:
            os.close(plan.fd)
        with contextlib.suppress(OSError):
            plan.tmp.unlink()
        with self._lock:
            self._compacting = False
            self._maybe_rebuild()

    # ------------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("the journal is closed")

    def close(self) -> None:
        """Commit what is staged, then release the files. Idempotent."""
        with self._compact_lock, self._commit_lock:
            if self._closed:
                return
            try:
                self._commit_locked()
            finally:
                with self._lock:
                    self._closed = True
                    self._abandon()

    def _abandon(self) -> None:
        """Drop every file descriptor without writing anything (also what a crash does)."""
        for seg in self._segments.values():
            with contextlib.suppress(OSError):
                os.close(seg.fd)
        self._segments.clear()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
        self._closed = True

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupCommit:
    """Lets many asyncio tasks share one ``Journal.commit`` (one write, one fsync).

    ``await group.commit()`` returns once everything staged before the call is durable (and
    visible), or raises the ``JournalError`` of the commit that should have covered it.
    Callers that arrive in the same event-loop pass -- or within ``window`` seconds, if
    set -- share one commit; the write and fsync run in a worker thread so the loop keeps
    serving, and commits do not overlap: callers arriving during one form the next.
    """

    def __init__(self, journal: Journal, *, window: float = 0.0) -> None:
        self._journal = journal
        self._window = window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdash-journal")
        self._next: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0
        """Commits run so far."""

    async def commit(self) -> None:
        """Wait until everything staged before this call is durable."""
        if self._closed:
            raise JournalError("the group commit is closed")
        fut = self._next
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._next = loop.create_future()
            fut.add_done_callback(_consume)
            if self._runner is None or self._runner.done():
                self._runner = loop.create_task(self._run())
        await asyncio.shield(fut)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            if self._window > 0:
                await asyncio.sleep(self._window)
            else:
                await asyncio.sleep(0)  # one loop pass: let this pass's callers join
            fut, self._next = self._next, None
            try:
                await loop.run_in_executor(self._executor, self._journal.commit)
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiter of this commit
                fut.set_exception(exc)
            else:
                fut.set_result(None)
            self.commits += 1

    async def close(self) -> None:
        """Finish the commits callers wait for, then stop the worker thread."""
        self._closed = True
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._executor.shutdown(wait=True)


def _consume(fut: asyncio.Future[None]) -> None:
    """Mark a shared commit's exception as retrieved even if every waiter went away."""
    if not fut.cancelled():
        fut.exception()
