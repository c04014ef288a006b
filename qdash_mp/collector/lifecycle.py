"""The collector's lifecycle data: workers, job tracking, rolling windows and the history.

``Lifecycle`` owns the pure pieces (``workers``, ``tracking``, ``windows``) and the on-disk
``History`` (``<data-dir>/history``), and runs the once-a-second tick: rolling windows from
the shared-memory lifetime buckets (only when the counters changed), ``History.tick`` from
``SharedStats.totals()`` in a thread, expiry of gone workers. ``History`` is not thread-safe:
every call to it holds ``_lock`` (the tick's thread, the web's reads, ``close``).

A history directory that cannot be opened (corrupt beyond what it repairs itself) is logged
and the collector runs without history: counting jobs matters more than charting them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from qdash_mp.collector.tracking import Tracking
from qdash_mp.collector.windows import Windows
from qdash_mp.collector.workers import Workers
from qdash_mp.errors import HistoryError
from qdash_mp.history import History
from qdash_mp.models import StatsView
from qdash_mp.settings import CollectorSettings

if TYPE_CHECKING:
    from qdash_mp.shm import SharedStats

__all__ = ["Lifecycle"]

log = logging.getLogger("qdash_mp.collector")

T = TypeVar("T")


class Lifecycle:
    """Workers, tracking, windows and history of one collector; see the module docstring."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.clock = settings.clock
        self.workers = Workers(settings.worker_retention)
        self.tracking = Tracking()
        self.windows = Windows()
        self.history: History | None = None
        self._lock = threading.Lock()
        self._seen_version = -1

    @property
    def history_dir(self) -> Path:
        return self.settings.data_dir / "history"

    async def open(self, stats: SharedStats) -> None:
        """Open the history and take the current lifetime buckets as the windows' baseline."""
        try:
            self.history = await asyncio.to_thread(History, self.history_dir, self.clock)
        except (HistoryError, OSError) as exc:
            log.error("history disabled: cannot open %s: %s", self.history_dir, exc)
        self.windows.prime({q: stats.buckets(q) for q in stats.totals()})

    async def run(self, stats: SharedStats, version: Callable[[], int]) -> None:
        """The tick, every ``tick_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.settings.tick_interval)
            try:
                await self.tick(stats, version())
            except (HistoryError, OSError) as exc:
                log.error("lifecycle tick failed (will try again): %s", exc)
            except Exception:
                # A bug here must not stop the ticks for good (nor the collector).
                log.exception("lifecycle tick failed (will try again)")

    async def tick(self, stats: SharedStats, version: int) -> None:
        now = self.clock()
        totals = stats.totals()
        if version != self._seen_version:
            self._seen_version = version
            self.windows.update(int(now // 60), {q: stats.buckets(q) for q in totals})
        if self.history is not None:
            history = self.history
            await self.locked(lambda: history.tick(totals, now))
        self.workers.expire(now)

    async def locked(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread, holding the lock every ``History`` call needs (the
        tick's thread, the web's and the hub publisher's reads; see the module docstring)."""

        def call() -> T:
            with self._lock:
                return fn()

        return await asyncio.to_thread(call)

    async def points(
        self, queue: str, resolution: Literal["minute", "hour"]
    ) -> list[dict[str, Any]]:
        history = self.history
        if history is None:
            return []
        return await self.locked(lambda: history.points(queue, resolution))

    def windows_of(self, queue: str) -> dict[str, dict[str, Any]]:
        return self.windows.summaries(queue, int(self.clock() // 60))

    def with_active(self, view: StatsView) -> StatsView:
        """``view`` with ``active`` per queue (and totals) from the connected workers' gauges."""
        active = self.workers.active_by_queue()
        if not active and not view.totals.active:
            return view
        queues = [dataclasses.replace(q, active=active.get(q.queue, 0)) for q in view.queues]
        total = sum(q.active for q in queues)
        return StatsView(queues, dataclasses.replace(view.totals, active=total))

    def close(self) -> None:
        """Close the history (waits for a tick in flight in its thread)."""
        with self._lock:
            if self.history is not None:
                self.history.close()
                self.history = None
