"""``Sampler``: periodic readings of processed counters, turned into jobs/min per queue.

Units: ``rate()`` and ``ThroughputSample.rate`` are jobs/min (the public contract);
``QueueStat.throughput``, ``/api/stats``, ``qdash-mp stats`` and the dashboard's "Jobs/s"
column are jobs/s (the dashboard shows ``rate() / 60``).

It polls an ``Inspector`` every ``interval`` seconds and keeps, per queue, the readings of
the last ``window`` seconds. ``sample()`` takes one reading now, and the clock is injectable,
so tests drive it without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from qdash_mp.inspector import Inspector
from qdash_mp.models import ThroughputSample

__all__ = ["Sampler"]

log = logging.getLogger("qdash_mp.sampler")

DEFAULT_INTERVAL = 5.0
DEFAULT_WINDOW = 60.0


class Sampler:
    """Rolling per-queue throughput from periodic ``Inspector.stats()`` readings.

    ``interval``/``window`` ≤ 0 mean the defaults (5 s / 60 s). ``start()`` needs a running
    loop and is idempotent; ``await stop()`` is idempotent and safe without ``start()``.
    """

    def __init__(
        self,
        inspector: Inspector,
        interval: float = DEFAULT_INTERVAL,
        window: float = DEFAULT_WINDOW,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inspector = inspector
        self.interval = interval if interval > 0 else DEFAULT_INTERVAL
        self.window_seconds = window if window > 0 else DEFAULT_WINDOW
        self._clock = clock
        self._samples: dict[str, deque[ThroughputSample]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sampling every ``interval`` seconds in the running loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="qdash_mp.sampler"
            )

    async def stop(self) -> None:
        """Stop sampling and wait for the task to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:
                log.exception("sampling the inspector failed; will retry next interval")
            await asyncio.sleep(self.interval)

    async def sample(self) -> None:
        """Take one reading of every queue now."""
        view = await self.inspector.stats()
        now = self._clock()
        for q in view.queues:
            samples = self._samples.setdefault(q.queue, deque())
            rate = 0.0
            if samples:
                prev = samples[-1]
                dt = now - prev.at
                if dt > 0:
                    rate = max(0, q.processed - prev.processed) * 60.0 / dt
            samples.append(ThroughputSample(at=now, processed=q.processed, rate=rate))
            horizon = now - self.window_seconds
            # keep one reading at or before the horizon so the window's start is measured
            while len(samples) > 1 and samples[1].at <= horizon:
                samples.popleft()

    def rate(self, queue: str) -> float:
        """Jobs/min processed on ``queue`` over the window (0.0 before two readings)."""
        samples = self._samples.get(queue)
        if not samples or len(samples) < 2:
            return 0.0
        first, last = samples[0], samples[-1]
        dt = last.at - first.at
        if dt <= 0:
            return 0.0
        return max(0, last.processed - first.processed) * 60.0 / dt

    def window(self, queue: str) -> list[ThroughputSample]:
        """The readings of ``queue`` in the window, oldest first."""
        return list(self._samples.get(queue, ()))
