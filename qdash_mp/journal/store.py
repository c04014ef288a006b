"""``Journal``: the collector's persistent failed-job store, an append-only checksummed log.

It keeps dead-lettered jobs on disk so that an acknowledged failed job survives ``kill -9``
(and power loss), with a small in-memory index (``index.Index``) so that list pages stay
fast at a million jobs. The parts: ``format`` (record bytes), ``scan`` (reading them back),
``index``, ``segments`` (files and shared state), ``recovery`` (open, torn tails, repair,
salvage), ``staging`` (encode + retention), ``compaction``, ``group_commit``. The long
story -- durability, torn tails vs. damage, the index's shape, retention -- is in
``docs/journal.md``.

Durability: ``commit()`` appends a COMMIT record, writes everything staged with one
``pwrite`` and makes it durable with one ``fdatasync``. If that fails, ``JournalError``:
nothing of it counts, the segment is cut back to its durable end (or, if even that fails,
the next commit starts a new segment whose header records that end), and the records stay
staged in front of anything staged since: never acknowledged-then-lost, never applied
twice.

Visibility: ``len``, ``page``, ``get``, ``in`` show committed state only; ``stage_removed``
checks against committed plus staged.

Threads: staging and reading may run on the event loop while ``commit`` runs in a worker
thread: one lock guards the staged buffer and the index, held by ``commit`` only to swap
the buffer out and to apply what it wrote; commits are serialised by a second lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgpack

from qdash_mp.errors import ConfigError, JournalError, NotFound
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.fsio import DEFAULT_IO, FileIO, try_flock
from qdash_mp.journal.compaction import Compaction
from qdash_mp.journal.format import Op, RecordType, commit_record
from qdash_mp.journal.recovery import Recovery, RecoveryReport
from qdash_mp.journal.segments import Segment
from qdash_mp.journal.staging import Staging
from qdash_mp.models import FailedJob, Job, JobView

__all__ = [
    "DEFAULT_COMPACT_MIN_BYTES",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_SEGMENT_BYTES",
    "ERROR_PREVIEW",
    "Journal",
]

logger = logging.getLogger("qdash_mp.journal")

DEFAULT_MAX_JOBS: Final = 1_000_000
DEFAULT_MAX_AGE: Final = 30 * 86400.0
DEFAULT_SEGMENT_BYTES: Final = 128 * 1024 * 1024
"""A segment is closed and a new one started once it holds this many bytes."""
DEFAULT_COMPACT_MIN_BYTES: Final = 16 * 1024 * 1024
"""``maybe_compact`` leaves less dead data than this alone."""
_HISTORY: Final = int(RecordType.HISTORY)
ERROR_PREVIEW: Final = 120
"""Characters of the error text a ``page`` row carries."""


_RAW: Final = object()
"""``_failed_job``'s default: decode the payload from the record's bytes."""


def _unpack_payload(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


class Journal(Recovery, Compaction, Staging):
    """The persistent failed-job store (see the module docstring for the guarantees).

    Keyed by job id: ``FailedJob.id`` is stored, and ``get`` rebuilds the ``Job`` with that
    id (the wire carries only the job id). Not a ``FailedJobs`` by itself: the collector
    wraps it (retry goes through a worker, and removal is staged then committed).
    """

    on_applied: Callable[[list[Op]], None] | None = None
    """Called with the records of each commit as they become visible, in the committing
    thread under the journal's lock (so a reader sees a change only once it was reported);
    must be quick and must not call the journal. The hub publisher's change list."""

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
        super().__init__(
            directory,
            max_jobs=max_jobs,
            max_age=max_age,
            clock=clock,
            segment_bytes=segment_bytes,
            compact_min_bytes=compact_min_bytes,
            io=io,
        )
        self.recovery = RecoveryReport()
        self.epoch = secrets.token_hex(8)
        """Random per open: append sequences (snapshots) are only comparable within it."""

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
            io=io if io is not None else DEFAULT_IO,
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
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not try_flock(fd):
            os.close(fd)
            raise JournalError(f"the journal in {self.directory} is in use by another process")
        self._lock_fd = fd

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
            buf, ops, metas = self._buf, self._ops, self._metas
            self._buf, self._ops, self._metas = bytearray(), [], []
        data_len = len(buf)
        seg: Segment | None = None
        try:
            if self._must_rotate:
                self._rotate("the previous segment could not be cut back after a failed write")
            seg = self._active
            assert seg is not None
            start = seg.end
            buf += commit_record(start, len(ops))
            self._io.pwrite_all(seg.fd, buf, start)
            self._io.fdatasync(seg.fd)
        except BaseException as exc:
            # Whatever went wrong, the batch is not durable: stage it again, in front. A copy,
            # not a resize: the failed write's traceback may still hold views of buf.
            restaged = buf[:data_len]
            if seg is not None:
                self._undo_write(seg)
            with self._lock:
                self._buf = restaged + self._buf
                self._ops = ops + self._ops
                self._metas = metas + self._metas
            if isinstance(exc, OSError):
                raise JournalError(f"journal commit failed: {exc}") from exc
            raise
        seg.end = start + len(buf)
        self._total_bytes += len(buf)
        with self._lock:
            pruned = self._apply(seg.num, start, ops, replay=False, metas=metas)
            if self.on_applied is not None:  # the hub's change list (qdash_mp.hub.publisher)
                self.on_applied(ops)
            self._refresh_pending()
            self._index.maybe_rebuild()
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

    def _undo_write(self, seg: Segment) -> None:
        """Cut ``seg`` back to its durable end after a failed write or sync."""
        try:
            self._io.truncate(seg.fd, seg.end)
            self._io.fdatasync(seg.fd)
        except OSError as exc:
            self._must_rotate = True
            logger.error(
                "could not cut %s back to %d bytes after a failed commit (%s); "
                "the next commit starts a new segment",
                seg.path,
                seg.end,
                exc,
            )

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._index.pos)

    def __contains__(self, id: object) -> bool:
        return id in self._index.pos

    def page(self, offset: int, limit: int) -> list[JobView]:
        """Up to ``limit`` committed failed jobs, newest first, skipping ``offset``."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        if limit == 0:
            return []
        with self._lock:
            self._check_open()
            return [self._view(p) for p in self._index.newest_slots(offset, limit)]

    def _view(self, p: int) -> JobView:
        f = self._read(p)
        return JobView(
            id=f.id,
            queue=f.queue,
            name=f.name,
            error=f.error[:ERROR_PREVIEW],
            attempts=f.attempts,
            failed_at=datetime.fromtimestamp(f.failed_at, UTC),
        )

    @property
    def high_water(self) -> int:
        """The append sequence the next committed failure gets (a snapshot of "now")."""
        return self._index.cols.next_seq

    def query(
        self,
        flt: FailedFilter,
        offset: int,
        limit: int,
        *,
        snapshot: int | None = None,
        since: int | None = None,
    ) -> tuple[list[JobView], int, int]:
        """``(rows, total, high_water)``: committed failed jobs matching ``flt``, newest
        first, skipping ``offset``; ``snapshot`` keeps only those appended before that
        high-water mark, ``since`` only those from it on (``qdash_mp.journal.columns``)."""
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        with self._lock:
            self._check_open()
            idx = self._index
            if flt.empty and snapshot is None and since is None:
                slots = idx.newest_slots(offset, limit) if limit else []
                return [self._view(p) for p in slots], len(idx.pos), idx.cols.next_seq
            sel = idx.cols.select(
                flt, idx.alive, len(idx.pos), offset, limit, seq_hw=snapshot, seq_lo=since
            )
            return [self._view(p) for p in sel.slots], sel.total, idx.cols.next_seq

    def snapshot_ids(self, flt: FailedFilter, snapshot: int, limit: int | None = None) -> list[str]:
        """Ids of the committed failed jobs matching ``flt`` appended before ``snapshot``
        (newest first; at most ``limit``): what a bulk action on a filter acts on."""
        with self._lock:
            self._check_open()
            idx = self._index
            cols = idx.cols
            codes = cols._codes(flt)
            if codes is None:
                return []
            hi = cols.seq_slot(snapshot)
            ids = idx.ids
            out = []
            for p in cols._walk(flt, codes, idx.alive, 0, hi):
                out.append(ids[p])
                if limit is not None and len(out) >= limit:
                    break
            return out

    def seq_of(self, id: str) -> int | None:
        """The append sequence of the committed record of ``id`` (``None``: not there)."""
        with self._lock:
            p = self._index.pos.get(id)
            return None if p is None else self._index.cols.seq[p]

    def flush_if_unchanged(self, snapshot: int) -> bool:
        """Stage a flush if no failure was committed or staged since ``snapshot``: True if
        staged. Otherwise nothing is staged (forget the snapshot's ids instead)."""
        with self._lock:
            self._check_open()
            if self._index.cols.next_seq != snapshot or self._p_queue:
                return False
        self.stage_flush()
        return True

    def history(self, id: str) -> list[FailedJob]:
        """Earlier failures of job ``id`` that a retry re-enqueued (HISTORY records), newest
        first: the job page's retry history."""
        with self._lock:
            self._check_open()
            entries = [tuple(e) for e in self._history.get(id, ())]
            fields = [self._read_at(loc, size, _HISTORY, id) for loc, size in entries]
        return [self._failed_job(f) for f in reversed(fields)]

    @staticmethod
    def _failed_job(f: Any, payload: Any = _RAW) -> FailedJob:
        """The ``FailedJob`` of stored fields ``f``; ``payload``: already decoded, or (by
        default) decoded here, shown as its bytes when it does not decode (history rows)."""
        if payload is _RAW:
            try:
                payload = _unpack_payload(f.payload_raw)
            except (ValueError, TypeError):
                payload = f.payload_raw  # shown as bytes rather than not at all
        job = Job(
            id=f.id, name=f.name, payload=payload, attempts=f.attempts, enqueued_at=f.enqueued_at
        )
        return FailedJob(
            id=f.id,
            queue=f.queue,
            job=job,
            error=f.error,
            failed_at=datetime.fromtimestamp(f.failed_at, UTC),
            traceback=f.traceback,
        )

    def get(self, id: str) -> FailedJob:
        """The whole committed record of ``id``, read from disk; ``NotFound`` if absent."""
        return self.get_raw(id)[0]

    def failed_at(self, id: str) -> float:
        """The exact ``failed_at`` (Unix seconds) of the committed record of ``id``.

        What ``stage_removed(..., if_failed_at=)`` compares against; ``NotFound`` if absent.
        """
        with self._lock:
            self._check_open()
            p = self._index.pos.get(id)
            if p is None:
                raise NotFound(id)
            return self._read(p).failed_at

    def get_raw(self, id: str) -> tuple[FailedJob, bytes]:
        """``get`` plus the payload's msgpack bytes exactly as stored (for a retry)."""
        with self._lock:
            self._check_open()
            p = self._index.pos.get(id)
            if p is None:
                raise NotFound(id)
            f = self._read(p)
        try:
            payload = _unpack_payload(f.payload_raw)
        except (ValueError, TypeError) as exc:
            raise JournalError(f"the stored payload of job {id!r} does not decode: {exc}") from None
        failed = self._failed_job(f, payload)
        return failed, f.payload_raw

    def ids(self) -> list[str]:
        """Every committed failed job id, a copy (for the hub's full reconciliation)."""
        with self._lock:
            self._check_open()
            return list(self._index.pos)

    @property
    def live_bytes(self) -> int:
        """Bytes of the live FAILED records."""
        return self._index.live_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of every segment."""
        return self._total_bytes

    # ------------------------------------------------------------------ closing

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
