"""The lifecycle pages: ``/queues/workers`` (who works on what, since when) and
``/queues/q/{queue}`` (one queue's counters and charts, its running jobs, pending/recent jobs
when tracked, a link to its failed jobs). Live: the queue page's counters follow the event
stream (``qdash.js``), the workers page re-reads its table (the queue page its job lists) every
``WORKERS_POLL_SECONDS``
(htmx ``hx-get``/``hx-select``) and counts the "running for" times up each second.

They read what the inspector offers (``workers``, ``pending``, ``recent`` are optional: the
embedded ``LocalInspector`` has no workers) and render through ``Dashboard.render``, so they
get the same look, CSRF cookie and access checks as every page (route names ``qdash.workers``
and ``qdash.queue``: ``view``).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from qdash_mp.failed_filter import FailedFilter
from qdash_mp.inspector import FailedQueries
from qdash_mp.models import JobView, QueueStat
from qdash_mp.web.views import REFRESH_SECONDS, Dashboard

QUEUE_FAILED_ROWS = 10  # the queue page shows its newest failures; the list has the rest

__all__ = ["WORKERS_POLL_SECONDS", "add_page_routes"]

WORKERS_POLL_SECONDS = 2
"""The workers page re-reads its table (a queue page its job lists) this often, with htmx;
without JavaScript the page reloads itself, less often."""


class _Pages:
    def __init__(self, dashboard: Dashboard) -> None:
        self.d = dashboard

    async def workers(self, request: web.Request) -> web.Response:
        ins: Any = self.d.inspector
        known = hasattr(ins, "workers")
        workers = list(await ins.workers()) if known else []
        # connected first, then by name; gone ones stay listed (greyed) until the collector
        # forgets them
        workers.sort(key=lambda w: (w.state != "connected", w.name, w.pid))
        return self.d.render(
            request,
            "workers.html",
            active="workers",
            workers=workers,
            known=known,
            now=time.time(),
            poll=WORKERS_POLL_SECONDS,
            failed_total=await self._failed_total(),
        )

    async def _queue_failed(self, queue: str) -> list[JobView] | None:
        """The queue's newest failed jobs (first page of the filtered list), or ``None`` when
        the inspector cannot filter (the page then only links to the failed list)."""
        ins = self.d.inspector
        if not isinstance(ins, FailedQueries):
            return None
        page = await ins.failed_query(FailedFilter(queue=queue), 1)
        return page.rows[:QUEUE_FAILED_ROWS]

    async def queue(self, request: web.Request) -> web.Response:
        name = request.match_info["queue"]
        view = await self.d.inspector.stats()
        stat = next((q for q in view.queues if q.queue == name), None)
        if stat is None:
            raise web.HTTPNotFound(text=f"No queue {name!r} has reported.")
        ins: Any = self.d.inspector
        pending = list(await ins.pending(name, 1)) if hasattr(ins, "pending") else []
        recent = list(await ins.recent(name, 1)) if hasattr(ins, "recent") else []
        known = hasattr(ins, "workers")
        workers = list(await ins.workers()) if known else []
        running = sorted(
            (
                (w, j)
                for w in workers
                if w.state == "connected"
                for j in w.active
                if j.queue == name
            ),
            key=lambda wj: wj[1].started_at,
        )
        return self.d.render(
            request,
            "queue.html",
            active="overview",
            stat=stat,
            per_second=self._per_second(stat),
            pending=pending,
            recent=recent,
            active_jobs=running,
            workers_known=known,
            now=time.time(),
            refresh=REFRESH_SECONDS,
            poll=WORKERS_POLL_SECONDS,
            chart_queues=[name],
            chart_title="History",
            runtime_note="(per period)",
            failed_total=await self._failed_total(),
            queue_failed=await self._queue_failed(name),
            details=self.d.details is not None,
        )

    def _per_second(self, stat: QueueStat) -> float:
        sampler = self.d.sampler
        if len(sampler.window(stat.queue)) >= 2:
            return sampler.rate(stat.queue) / 60.0
        return stat.throughput

    async def _failed_total(self) -> int | None:
        details = self.d.details
        return await details.failed_count() if details is not None else None


def add_page_routes(router: web.UrlDispatcher, dashboard: Dashboard) -> None:
    """``GET /queues/workers`` and ``GET /queues/q/{queue}``."""
    pages = _Pages(dashboard)
    router.add_get("/queues/workers", pages.workers, name="qdash.workers")
    router.add_get("/queues/q/{queue}", pages.queue, name="qdash.queue")
