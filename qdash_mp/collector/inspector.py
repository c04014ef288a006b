"""``CollectorInspector``: the dashboard's ``Inspector`` over a running collector.

Beyond the protocol: ``failed_count``/``failed_job`` (detail pages) and the lifecycle reads
``pending``/``recent`` (tracked jobs), ``history``, ``workers`` and ``windows``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from qdash_mp.failed_filter import FailedFilter
from qdash_mp.inspector import FailedPage, page_bounds
from qdash_mp.models import FailedJob, JobView, StatsView, TrackedJob, WorkerView

if TYPE_CHECKING:
    from qdash_mp.collector.daemon import Collector

__all__ = ["CollectorInspector"]


class CollectorInspector:
    """The dashboard's ``Inspector`` over a running collector's shared stats and journal."""

    def __init__(self, collector: Collector) -> None:
        self._c = collector
        self._view: tuple[tuple[object, ...], StatsView] | None = None

    async def stats(self) -> StatsView:
        # One snapshot per counters change and second (throughput moves with the clock):
        # many open dashboards cost the daemon one snapshot, not one each.
        # Active counts come from the workers' gauges, so they are part of the key too.
        lc = self._c.lifecycle
        active = lc.workers.active_by_queue()
        key = (self._c.stats_version, int(time.time()), tuple(sorted(active.items())))
        if self._view is None or self._view[0] != key:
            self._view = (key, lc.with_active(self._c.stats.snapshot()))
        return self._view[1]

    async def pending(self, queue: str, page: int) -> list[TrackedJob]:
        """Tracked jobs pushed and not started, oldest first (``[]`` if not tracked)."""
        offset, limit = page_bounds(page)
        return self._c.lifecycle.tracking.pending(queue, offset, limit)

    async def recent(self, queue: str, page: int) -> list[TrackedJob]:
        """Tracked jobs finished, newest first (``[]`` if not tracked)."""
        offset, limit = page_bounds(page)
        return self._c.lifecycle.tracking.recent(queue, offset, limit)

    async def history(
        self, queue: str, resolution: Literal["minute", "hour"]
    ) -> list[dict[str, Any]]:
        """DESIGN.md's history points of ``queue``, oldest first."""
        return await self._c.lifecycle.points(queue, resolution)

    async def workers(self) -> list[WorkerView]:
        """Connected workers, then the recently gone."""
        return self._c.lifecycle.workers.views()

    async def windows(self, queue: str) -> dict[str, dict[str, Any]]:
        """Rolling runtime/wait summaries of ``queue``: ``{"1m"|"5m"|"1h": {"runtime",
        "wait"}}``."""
        return self._c.lifecycle.windows_of(queue)

    async def failed(self, page: int) -> list[JobView]:
        offset, limit = page_bounds(page)
        return self._c.journal.page(offset, limit)

    async def failed_count(self) -> int:
        return len(self._c.journal)

    async def failed_job(self, id: str) -> FailedJob:
        return await asyncio.to_thread(self._c.journal.get, id)

    async def retry(self, id: str) -> None:
        await self._c.retries.retry(id)

    async def forget(self, id: str) -> None:
        await self._c.retries.forget(id)

    async def flush_failed(self) -> int:
        return await self._c.retries.flush_failed()

    # -- filters, snapshots, bulk (inspector.FailedQueries) -----------------------------------

    @property
    def failed_epoch(self) -> str:
        return self._c.journal.epoch

    async def failed_query(
        self, flt: FailedFilter, page: int, *, snapshot: int | None = None, since: int | None = None
    ) -> FailedPage:
        offset, limit = page_bounds(page)
        journal = self._c.journal
        if flt.empty and snapshot is None and since is None:  # O(page): on the loop
            rows, total, hw = journal.query(flt, offset, limit)
            return FailedPage(rows, total, hw, journal.epoch)
        # A text or time filter may walk many slots: off the event loop.
        rows, total, hw = await asyncio.to_thread(
            journal.query, flt, offset, limit, snapshot=snapshot, since=since
        )
        return FailedPage(rows, total, hw, journal.epoch)

    async def failed_ids(self, flt: FailedFilter, snapshot: int) -> list[str]:
        return await asyncio.to_thread(self._c.journal.snapshot_ids, flt, snapshot)

    async def failed_seq(self, id: str) -> int | None:
        return self._c.journal.seq_of(id)

    async def forget_many(self, ids: Sequence[str]) -> int:
        return await self._c.retries.forget_many(ids)

    async def flush_before(self, snapshot: int) -> int:
        return await self._c.retries.flush_before(snapshot)

    def can_retry(self, queue: str) -> bool:
        return self._c.retries.can_retry(queue)

    async def failed_history(self, id: str) -> list[FailedJob]:
        return await asyncio.to_thread(self._c.journal.history, id)
