"""The ``Inspector`` protocol (what the dashboard reads and does) and its in-process version.

The dashboard only talks to an ``Inspector``; the embedded one here wraps a ``Stats`` and a
``MemoryFailedJobs``, the collector provides another over shared memory and its journal.
All methods are ``async`` so an implementation may do I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qdash_mp.errors import NotFound
from qdash_mp.failed import MemoryFailedJobs
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.models import PAGE_SIZE, FailedJob, JobView, StatsView, TrackedJob
from qdash_mp.stats import Stats

__all__ = [
    "FailedPage",
    "FailedQueries",
    "Inspector",
    "LocalInspector",
    "new_inspector",
    "page_bounds",
]


def page_bounds(page: int) -> tuple[int, int]:
    """``(offset, limit)`` of 1-based ``page``; pages below 1 are treated as page 1."""
    return (max(page, 1) - 1) * PAGE_SIZE, PAGE_SIZE


@runtime_checkable
class Inspector(Protocol):
    """Read and act on a queue system's state, for the dashboard."""

    async def stats(self) -> StatsView:
        """Per-queue counters and totals."""
        ...

    async def pending(self, queue: str, page: int) -> Sequence[JobView | TrackedJob]:
        """Jobs waiting on ``queue`` (1-based page of ``PAGE_SIZE``), if the source knows them
        (tracked jobs: ``TrackedJob`` rows)."""
        ...

    async def failed(self, page: int) -> list[JobView]:
        """Failed jobs, newest first (1-based page of ``PAGE_SIZE``)."""
        ...

    async def retry(self, id: str) -> None:
        """Re-enqueue failed job ``id`` and drop it; ``NotFound`` if unknown."""
        ...

    async def forget(self, id: str) -> None:
        """Drop failed job ``id``; ``NotFound`` if unknown."""
        ...

    async def flush_failed(self) -> int:
        """Drop every failed job; returns how many were dropped."""
        ...


@dataclass(frozen=True, slots=True)
class FailedPage:
    """One page of a filtered failed list, how many match, and the snapshot it was taken at
    (``snapshot``: a high-water mark of the store's append sequence, valid within ``epoch``)."""

    rows: list[JobView]
    total: int
    snapshot: int
    epoch: str


@runtime_checkable
class FailedQueries(Protocol):
    """Optional inspector extras for filters, snapshot-bounded bulk actions and history.

    Both built-in inspectors provide them; the dashboard falls back to the plain protocol
    (unfiltered pages, no bulk actions) for an inspector without them.
    """

    @property
    def failed_epoch(self) -> str:
        """Changes when snapshots stop being comparable (a restarted collector)."""
        ...

    async def failed_query(
        self, flt: FailedFilter, page: int, *, snapshot: int | None = None, since: int | None = None
    ) -> FailedPage:
        """A page of failed jobs matching ``flt``; ``snapshot``: recorded before it only;
        ``since``: recorded from it on only."""
        ...

    async def failed_ids(self, flt: FailedFilter, snapshot: int) -> list[str]:
        """Ids of the failed jobs matching ``flt`` recorded before ``snapshot``."""
        ...

    async def failed_seq(self, id: str) -> int | None:
        """The append sequence of the stored record of ``id`` (``None``: not stored)."""
        ...

    async def forget_many(self, ids: Sequence[str]) -> int:
        """Drop the records of ``ids`` (unknown ones skipped); returns how many went."""
        ...

    async def flush_before(self, snapshot: int) -> int:
        """Drop every failed job recorded before ``snapshot``; returns how many went."""
        ...

    def can_retry(self, queue: str) -> bool:
        """Whether a retry of a job of ``queue`` has anywhere to re-enqueue it now."""
        ...

    async def failed_history(self, id: str) -> list[FailedJob]:
        """Earlier failures of job ``id`` that dashboard retries re-enqueued, newest first."""
        ...


class LocalInspector:
    """An ``Inspector`` over an in-process ``Stats`` and ``MemoryFailedJobs`` (either optional).

    Beyond the protocol it offers ``failed_count()`` and ``failed_job(id)`` (detail pages).
    """

    def __init__(self, stats: Stats | None, failed: MemoryFailedJobs | None) -> None:
        self._stats = stats
        self._failed = failed
        self._epoch = secrets.token_hex(8)

    @property
    def failed_epoch(self) -> str:
        return self._epoch

    async def failed_query(
        self, flt: FailedFilter, page: int, *, snapshot: int | None = None, since: int | None = None
    ) -> FailedPage:
        if self._failed is None:
            return FailedPage([], 0, 0, self._epoch)
        offset, limit = page_bounds(page)
        rows, total, hw = self._failed.query(flt, offset, limit, snapshot=snapshot, since=since)
        return FailedPage([f.view() for f in rows], total, hw, self._epoch)

    async def failed_ids(self, flt: FailedFilter, snapshot: int) -> list[str]:
        return [] if self._failed is None else self._failed.snapshot_ids(flt, snapshot)

    async def failed_seq(self, id: str) -> int | None:
        return None if self._failed is None else self._failed.seq_of(id)

    async def forget_many(self, ids: Sequence[str]) -> int:
        n = 0
        for id in ids:
            try:
                await self.forget(id)
            except NotFound:
                continue
            n += 1
        return n

    async def flush_before(self, snapshot: int) -> int:
        return 0 if self._failed is None else self._failed.flush_before(snapshot)

    def can_retry(self, queue: str) -> bool:
        return self._failed is not None and self._failed.can_requeue

    async def failed_history(self, id: str) -> list[FailedJob]:
        return [] if self._failed is None else self._failed.history(id)

    async def stats(self) -> StatsView:
        return self._stats.snapshot() if self._stats is not None else StatsView()

    async def pending(self, queue: str, page: int) -> list[TrackedJob]:
        """Tracked jobs pushed on ``queue`` and not started, oldest first (``Stats(track_jobs=
        ...)``); untracked, the jobs live in the user's queue backend only: ``[]``."""
        if self._stats is None:
            return []
        offset, limit = page_bounds(page)
        return self._stats.pending(queue, offset, limit)

    async def recent(self, queue: str, page: int) -> list[TrackedJob]:
        """Tracked jobs of ``queue`` that finished, newest first."""
        if self._stats is None:
            return []
        offset, limit = page_bounds(page)
        return self._stats.recent(queue, offset, limit)

    async def failed(self, page: int) -> list[JobView]:
        if self._failed is None:
            return []
        offset, limit = page_bounds(page)
        return [f.view() for f in self._failed.page(offset, limit)]

    async def failed_count(self) -> int:
        return len(self._failed) if self._failed is not None else 0

    async def failed_job(self, id: str) -> FailedJob:
        if self._failed is None:
            raise NotFound(id)
        return self._failed.get(id)

    async def retry(self, id: str) -> None:
        if self._failed is None:
            raise NotFound(id)
        self._failed.retry(id)

    async def forget(self, id: str) -> None:
        if self._failed is None:
            raise NotFound(id)
        self._failed.forget(id)

    async def flush_failed(self) -> int:
        return self._failed.flush() if self._failed is not None else 0


def new_inspector(stats: Stats | None, failed: MemoryFailedJobs | None) -> LocalInspector:
    """An ``Inspector`` over in-process ``stats`` and ``failed``; either may be ``None``."""
    return LocalInspector(stats, failed)
