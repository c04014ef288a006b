"""Dead-letter stores: the ``FailedJobs`` protocol and the in-process ``MemoryFailedJobs``.

A failed job is keyed by its job id: a second failure of the same job replaces the older
record (and becomes the newest). ``retry`` hands the job to ``requeue`` and drops the record
only once that returned, so a failing re-enqueue never loses the job.

Retries follow the collector's rules (docs/collector.md, "Retries"): exactly once per id (a
concurrent second retry gets ``RetryConflict``, a later one ``NotFound``); a newer failure
of the job recorded meanwhile stays; the job handed to ``requeue`` carries ``attempts + 1``;
and with ``with_stats`` a retry counts ``retried`` +1 and ``pushed`` +1 (it is enqueued
again), so ``requeue`` must not call ``on_pushed`` for it.
"""

from __future__ import annotations

import builtins
import dataclasses
import threading
import traceback as tb
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qdash_mp.errors import NotFound, RetryConflict
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.models import FailedJob, Job

if TYPE_CHECKING:
    from qdash_mp.stats import Stats

__all__ = ["HISTORY_MAX", "FailedJobs", "MemoryFailedJobs", "Requeue", "describe_error"]

HISTORY_MAX = 10
"""Earlier (retried) failures kept per job id for the job page's retry history."""

Requeue = Callable[[Job], object]
"""Puts a job back on its queue; raising means it was not re-enqueued."""


@runtime_checkable
class FailedJobs(Protocol):
    """What the dashboard needs of a dead-letter store."""

    def list(self) -> list[FailedJob]:
        """Every stored failed job, newest first."""
        ...

    def retry(self, id: str) -> None:
        """Re-enqueue the job and drop its record; ``NotFound`` for an unknown id."""
        ...

    def forget(self, id: str) -> None:
        """Drop the record; ``NotFound`` for an unknown id."""
        ...


def describe_error(error: BaseException | str) -> tuple[str, str]:
    """``(error text, traceback text)`` for an exception or a plain message."""
    if isinstance(error, BaseException):
        text = f"{type(error).__qualname__}: {error}" if str(error) else type(error).__qualname__
        trace = "".join(tb.format_exception(error)) if error.__traceback__ is not None else ""
        return text, trace
    return str(error), ""


class MemoryFailedJobs:
    """An in-process, thread-safe dead-letter store.

    ``requeue(job)`` is called by ``retry``; if it raises, the record is kept and the error
    propagates. ``requeue=None`` makes ``retry`` forget-only.
    """

    def __init__(self, requeue: Requeue | None = None) -> None:
        self._requeue = requeue
        self._lock = threading.Lock()
        self._jobs: dict[str, FailedJob] = {}  # insertion order = oldest first
        self._retrying: set[str] = set()
        self._stats: Stats | None = None
        self._seq: dict[str, int] = {}  # id -> append sequence of its record (snapshots)
        self._next_seq = 0
        self._history: dict[str, builtins.list[FailedJob]] = {}  # id -> retried, oldest first

    def with_stats(self, stats: Stats) -> MemoryFailedJobs:
        """Count every successful retry in ``stats``; returns ``self``.

        A retry counts ``retried`` +1 and, as the job is enqueued again, ``pushed`` +1 (one
        ``add``), so ``pushed == processed + failed + pending`` holds across it.
        """
        self._stats = stats
        return self

    def record(self, job: Job, queue: str, error: BaseException | str) -> FailedJob:
        """Store ``job`` as failed on ``queue`` now (UTC), replacing an older failure of it."""
        text, trace = describe_error(error)
        failed = FailedJob(
            id=job.id,
            queue=queue,
            job=job,
            error=text,
            failed_at=datetime.now(UTC),
            traceback=trace,
        )
        with self._lock:
            self._jobs.pop(job.id, None)
            self._jobs[job.id] = failed
            self._seq[job.id] = self._next_seq
            self._next_seq += 1
        return failed

    @property
    def can_requeue(self) -> bool:
        """Whether ``retry`` re-enqueues (``False``: it only forgets)."""
        return self._requeue is not None

    @property
    def high_water(self) -> int:
        """The sequence the next recorded failure gets: a snapshot of "now"."""
        return self._next_seq

    def query(
        self,
        flt: FailedFilter,
        offset: int,
        limit: int,
        *,
        snapshot: int | None = None,
        since: int | None = None,
    ) -> tuple[builtins.list[FailedJob], int, int]:
        """``(page, total, high_water)`` of the records matching ``flt``, newest first;
        ``snapshot``: only those recorded before that high-water mark, ``since``: only
        those from it on. A linear scan: the embedded store is meant to stay small."""
        with self._lock:
            seqs = self._seq
            hits = [
                f
                for f in reversed(self._jobs.values())
                if (snapshot is None or seqs[f.id] < snapshot)
                and (since is None or seqs[f.id] >= since)
                and flt.matches(f.queue, f.job.name, f.error, f.failed_at.timestamp())
            ]
            return hits[offset : offset + limit], len(hits), self._next_seq

    def snapshot_ids(self, flt: FailedFilter, snapshot: int) -> builtins.list[str]:
        """Ids matching ``flt`` recorded before ``snapshot``, newest first."""
        rows, _total, _hw = self.query(flt, 0, len(self._jobs), snapshot=snapshot)
        return [f.id for f in rows]

    def seq_of(self, id: str) -> int | None:
        """The sequence of the record of ``id`` (``None``: none)."""
        with self._lock:
            return self._seq.get(id) if id in self._jobs else None

    def history(self, id: str) -> builtins.list[FailedJob]:
        """Earlier failures of job ``id`` that a retry re-enqueued, newest first."""
        with self._lock:
            return list(reversed(self._history.get(id, ())))

    def list(self) -> list[FailedJob]:
        """Every stored failed job, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def page(self, offset: int, limit: int) -> builtins.list[FailedJob]:
        """``limit`` records starting ``offset`` records from the newest."""
        with self._lock:
            if offset >= len(self._jobs):  # also keeps huge offsets away from islice
                return []
            return list(islice(reversed(self._jobs.values()), offset, offset + limit))

    def get(self, id: str) -> FailedJob:
        """The record of ``id``; ``NotFound`` if there is none."""
        with self._lock:
            try:
                return self._jobs[id]
            except KeyError:
                raise NotFound(id) from None

    def retry(self, id: str) -> None:
        """Re-enqueue the job, then drop its record.

        The lock is not held while ``requeue`` runs (it may call back into this store); a
        concurrent retry of the same id raises ``RetryConflict`` instead of re-enqueueing
        twice. If the job failed again while being re-enqueued, the newer record stays; if it
        was forgotten meanwhile, the retry still succeeds (the job was re-enqueued). The job
        handed to ``requeue`` carries ``attempts + 1``.
        """
        with self._lock:
            failed = self._jobs.get(id)
            if failed is None:
                raise NotFound(id)
            if id in self._retrying:
                raise RetryConflict(f"a retry of job {id!r} is already in progress")
            self._retrying.add(id)
        try:
            if self._requeue is not None:
                job = failed.job
                self._requeue(dataclasses.replace(job, attempts=job.attempts + 1))
            with self._lock:
                if self._jobs.get(id) is failed:
                    del self._jobs[id]
                kept = self._history.setdefault(id, [])
                kept.append(failed)
                del kept[:-HISTORY_MAX]
        finally:
            with self._lock:
                self._retrying.discard(id)
        if self._stats is not None:
            # Re-enqueued: a push. Forget-only (no ``requeue``) enqueues nothing.
            pushed = 1 if self._requeue is not None else 0
            self._stats.add(failed.queue, pushed=pushed, retried=1)

    def forget(self, id: str) -> None:
        """Drop the record of ``id``; ``NotFound`` if there is none."""
        with self._lock:
            try:
                del self._jobs[id]
            except KeyError:
                raise NotFound(id) from None

    def flush(self) -> int:
        """Drop every record; returns how many there were."""
        with self._lock:
            n = len(self._jobs)
            self._jobs.clear()
            return n

    def flush_before(self, snapshot: int) -> int:
        """Drop every record made before ``snapshot`` (a high-water mark); returns how many.

        Later failures stay: a flush confirmed on a page removes what that page counted."""
        with self._lock:
            doomed = [id for id in self._jobs if self._seq[id] < snapshot]
            for id in doomed:
                del self._jobs[id]
            return len(doomed)

    def len(self) -> int:
        """How many failed jobs are stored."""
        return len(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)
