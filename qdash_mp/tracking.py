"""Opt-in job tracking: pending jobs (pushed, not started) and recent finished jobs per queue.

Pure and unlocked (the owner locks). Bounded: at most ``PENDING_MAX`` pending jobs per queue
(pushing one more drops the oldest, counted in ``dropped``) and a ring of the last
``RECENT_MAX`` finished jobs per queue. Memory: a row is a small frozen ``TrackedJob`` (about
200 bytes with its strings), so a fully tracked queue holds at most ~2.2 MB.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable

from qdash_mp.models import TrackedJob

__all__ = ["PENDING_MAX", "RECENT_MAX", "JobTracker"]

PENDING_MAX = 10_000
"""Pending jobs kept per tracked queue; the oldest is dropped beyond."""
RECENT_MAX = 1_000
"""Finished jobs kept per tracked queue (a ring, newest first when read)."""


class JobTracker:
    """Pending and recent jobs of the tracked queues (``track``: True for all, or names)."""

    __slots__ = ("_all", "_pending", "_pending_max", "_queues", "_recent", "_recent_max", "dropped")

    def __init__(
        self,
        track: bool | Iterable[str],
        *,
        pending_max: int = PENDING_MAX,
        recent_max: int = RECENT_MAX,
    ) -> None:
        self._all = track is True
        self._queues = frozenset() if isinstance(track, bool) else frozenset(track)
        self._pending_max = pending_max
        self._recent_max = recent_max
        self._pending: dict[str, collections.OrderedDict[str, TrackedJob]] = {}
        self._recent: dict[str, collections.deque[TrackedJob]] = {}
        self.dropped = 0
        """Pending jobs dropped because their queue held ``pending_max`` already."""

    def tracks(self, queue: str) -> bool:
        return self._all or queue in self._queues

    def pushed(self, queue: str, job_id: str, name: str, enqueued_at: float | None) -> None:
        pending = self._pending.get(queue)
        if pending is None:
            pending = self._pending[queue] = collections.OrderedDict()
        pending[job_id] = TrackedJob(job_id, queue, name, "pending", enqueued_at)
        if len(pending) > self._pending_max:
            pending.popitem(last=False)
            self.dropped += 1

    def started(self, queue: str, job_id: str) -> TrackedJob | None:
        """The job leaves the pending list; returns its pending row if it was there."""
        pending = self._pending.get(queue)
        return None if pending is None else pending.pop(job_id, None)

    def finished(self, row: TrackedJob) -> None:
        recent = self._recent.get(row.queue)
        if recent is None:
            recent = self._recent[row.queue] = collections.deque(maxlen=self._recent_max)
        recent.append(row)

    def pending(self, queue: str, offset: int, limit: int) -> list[TrackedJob]:
        """Pending jobs of ``queue``, oldest first."""
        pending = self._pending.get(queue)
        if not pending:
            return []
        return list(itertools.islice(pending.values(), offset, offset + limit))

    def recent(self, queue: str, offset: int, limit: int) -> list[TrackedJob]:
        """Finished jobs of ``queue``, newest first."""
        recent = self._recent.get(queue)
        if not recent:
            return []
        return list(itertools.islice(reversed(recent), offset, offset + limit))

    def sizes(self, queue: str) -> tuple[int, int]:
        """(pending, recent) rows held for ``queue``."""
        return len(self._pending.get(queue, ())), len(self._recent.get(queue, ()))
