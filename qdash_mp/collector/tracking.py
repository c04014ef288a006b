"""Opt-in job tracking in the collector: pending and recent jobs per queue, bounded, in memory.

Fed with BATCH v2 ``"t"`` events ``(kind, queue, job_id, name, at, runtime)``, kind ``"p"``
pushed, ``"s"`` started, ``"d"`` done (processed), ``"f"`` failed. Pure (no I/O, no clock).

Per queue: *pending* (pushed, not started; oldest first; at most ``max_pending``, the oldest
dropped and counted), *started* (to give a finished job its start time; same bound) and
*recent* (finished, newest first; a ring of ``max_recent``). Resent events are harmless: a
push of a pending id, a start of an unknown id and a finish of an id already recent are
ignored. Memory: about 300 bytes a row, so at most ~(2 x 10,000 + 1,000) x 300 B = 6 MB a
queue, and at most ``max_queues`` queues (events of more are dropped and counted). Best
effort: lost with a collector restart (documented in docs/collector.md).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable

from qdash_mp.models import TrackedJob

__all__ = ["MAX_PENDING", "MAX_QUEUES", "MAX_RECENT", "Event", "Tracking"]

MAX_PENDING = 10_000
MAX_RECENT = 1_000
MAX_QUEUES = 1_000

Event = tuple[str, str, str, str, float, float | None]

_RESULT = {"d": "processed", "f": "failed"}


class _Queue:
    __slots__ = ("pending", "recent", "recent_ids", "started")

    def __init__(self, max_recent: int) -> None:
        self.pending: OrderedDict[str, TrackedJob] = OrderedDict()
        self.started: OrderedDict[str, TrackedJob] = OrderedDict()
        self.recent: deque[TrackedJob] = deque(maxlen=max_recent)
        self.recent_ids: set[str] = set()


class Tracking:
    """Pending/recent jobs of tracked queues; see the module docstring."""

    def __init__(
        self,
        max_pending: int = MAX_PENDING,
        max_recent: int = MAX_RECENT,
        max_queues: int = MAX_QUEUES,
    ) -> None:
        self.max_pending = max_pending
        self.max_recent = max_recent
        self.max_queues = max_queues
        self._q: dict[str, _Queue] = {}
        self.dropped = 0
        """Events or rows dropped for a bound (pending overflow, too many queues)."""

    def _queue(self, name: str) -> _Queue | None:
        tq = self._q.get(name)
        if tq is None:
            if len(self._q) >= self.max_queues:
                self.dropped += 1
                return None
            tq = self._q[name] = _Queue(self.max_recent)
        return tq

    def apply(self, events: Iterable[Event]) -> None:
        """Apply a batch's tracking events in order."""
        for kind, queue, job_id, name, at, runtime in events:
            tq = self._queue(queue)
            if tq is None:
                continue
            if kind == "p":
                if job_id not in tq.pending and job_id not in tq.recent_ids:
                    tq.pending[job_id] = TrackedJob(job_id, queue, name, "pending", enqueued_at=at)
                    if len(tq.pending) > self.max_pending:
                        tq.pending.popitem(last=False)
                        self.dropped += 1
            elif kind == "s":
                if job_id in tq.recent_ids or job_id in tq.started:
                    continue
                was = tq.pending.pop(job_id, None)
                enq = was.enqueued_at if was is not None else None
                tq.started[job_id] = TrackedJob(job_id, queue, name, "active", enq, at)
                if len(tq.started) > self.max_pending:
                    tq.started.popitem(last=False)
                    self.dropped += 1
            elif kind in _RESULT:
                if job_id in tq.recent_ids:
                    continue
                tq.pending.pop(job_id, None)
                run = tq.started.pop(job_id, None)
                enq, started = (
                    (run.enqueued_at, run.started_at) if run is not None else (None, None)
                )
                if len(tq.recent) == tq.recent.maxlen:
                    tq.recent_ids.discard(tq.recent[0].id)
                row = TrackedJob(job_id, queue, name, _RESULT[kind], enq, started, at, runtime)
                tq.recent.append(row)
                tq.recent_ids.add(job_id)
            # unknown kinds: ignored (room to grow, like the wire's unknown keys)

    def queues(self) -> list[str]:
        """Queues with tracked jobs."""
        return sorted(self._q)

    def pending(self, queue: str, offset: int, limit: int) -> list[TrackedJob]:
        """Pending jobs of ``queue``, oldest first (``[]`` for an untracked queue)."""
        tq = self._q.get(queue)
        if tq is None:
            return []
        return list(itertools.islice(tq.pending.values(), offset, offset + limit))

    def recent(self, queue: str, offset: int, limit: int) -> list[TrackedJob]:
        """Finished jobs of ``queue``, newest first (``[]`` for an untracked queue)."""
        tq = self._q.get(queue)
        if tq is None:
            return []
        return list(itertools.islice(reversed(tq.recent), offset, offset + limit))

    def counts(self, queue: str) -> tuple[int, int]:
        """``(pending, recent)`` rows held for ``queue``."""
        tq = self._q.get(queue)
        return (len(tq.pending), len(tq.recent)) if tq is not None else (0, 0)
