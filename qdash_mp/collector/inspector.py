"""``CollectorInspector``: the dashboard's ``Inspector`` over a running collector."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from qdash_mp.inspector import page_bounds
from qdash_mp.models import FailedJob, JobView, StatsView

if TYPE_CHECKING:
    from qdash_mp.collector.daemon import Collector

__all__ = ["CollectorInspector"]


class CollectorInspector:
    """The dashboard's ``Inspector`` over a running collector's shared stats and journal."""

    def __init__(self, collector: Collector) -> None:
        self._c = collector
        self._view: tuple[tuple[int, int], StatsView] | None = None

    async def stats(self) -> StatsView:
        # One snapshot per counters change and second (throughput moves with the clock):
        # many open dashboards cost the daemon one snapshot, not one each.
        key = (self._c.stats_version, int(time.time()))
        if self._view is None or self._view[0] != key:
            self._view = (key, self._c.stats.snapshot())
        return self._view[1]

    async def pending(self, queue: str, page: int) -> list[JobView]:
        # The collector sees counts, not the jobs waiting in the user's queue backend.
        return []

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
