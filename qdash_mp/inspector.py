"""The ``Inspector`` protocol (what the dashboard reads and does) and its in-process version.

The dashboard only talks to an ``Inspector``; the embedded one here wraps a ``Stats`` and a
``MemoryFailedJobs``, the collector provides another over shared memory and its journal.
All methods are ``async`` so an implementation may do I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from qdash_mp.errors import NotFound
from qdash_mp.failed import MemoryFailedJobs
from qdash_mp.models import PAGE_SIZE, FailedJob, JobView, StatsView, TrackedJob
from qdash_mp.stats import Stats

__all__ = ["Inspector", "LocalInspector", "new_inspector", "page_bounds"]


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


class LocalInspector:
    """An ``Inspector`` over an in-process ``Stats`` and ``MemoryFailedJobs`` (either optional).

    Beyond the protocol it offers ``failed_count()`` and ``failed_job(id)`` (detail pages).
    """

    def __init__(self, stats: Stats | None, failed: MemoryFailedJobs | None) -> None:
        self._stats = stats
        self._failed = failed

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
