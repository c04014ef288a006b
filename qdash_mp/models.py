"""Plain data types shared by every part: jobs, failed-job records, counter rows, list rows.

They are frozen where they are values (``QueueStat``, ``StatsView``, ``JobView``) and carry
no behaviour beyond conversion to JSON-ready dicts, so the embedded store, the collector and
the dashboard all speak the same types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "PAGE_SIZE",
    "FailedJob",
    "Job",
    "JobView",
    "QueueStat",
    "StatsView",
    "ThroughputSample",
]

PAGE_SIZE = 50
"""Rows per page of every paginated listing (dashboard and ``Inspector``)."""


@dataclass(slots=True)
class Job:
    """A unit of work as the worker knows it. ``payload`` must be msgpack-able."""

    id: str
    name: str
    payload: Any = None
    attempts: int = 0
    enqueued_at: float | None = None


@dataclass(slots=True)
class FailedJob:
    """A dead-lettered job: what failed, where, why and when (``failed_at`` is UTC)."""

    id: str
    queue: str
    job: Job
    error: str
    failed_at: datetime
    traceback: str = ""

    def view(self) -> JobView:
        """The flat row shown in lists."""
        return JobView(
            id=self.id,
            queue=self.queue,
            name=self.job.name,
            error=self.error,
            attempts=self.job.attempts,
            failed_at=self.failed_at,
        )


@dataclass(frozen=True, slots=True)
class JobView:
    """A flat, list-friendly row for one job."""

    id: str
    queue: str
    name: str
    error: str
    attempts: int
    failed_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict keyed by field name; ``failed_at`` as ISO 8601."""
        return {
            "id": self.id,
            "queue": self.queue,
            "name": self.name,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
        }


@dataclass(frozen=True, slots=True)
class QueueStat:
    """Counters of one queue (or of all, for totals).

    ``pending`` is ``pushed - processed - failed`` floored at 0; ``throughput`` is processed
    jobs per second over the rolling window.
    """

    queue: str
    pushed: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    pending: int = 0
    throughput: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict keyed by field name (built by hand: ``asdict`` is 10x slower)."""
        return {
            "queue": self.queue,
            "pushed": self.pushed,
            "processed": self.processed,
            "failed": self.failed,
            "retried": self.retried,
            "pending": self.pending,
            "throughput": self.throughput,
        }


@dataclass(frozen=True, slots=True)
class StatsView:
    """A consistent snapshot: ``queues`` sorted by name, and their ``totals``."""

    queues: list[QueueStat] = field(default_factory=list)
    totals: QueueStat = field(default_factory=lambda: QueueStat(queue="total"))

    def to_dict(self) -> dict[str, Any]:
        """The ``/queues/api/stats`` document."""
        return {
            "queues": [q.to_dict() for q in self.queues],
            "totals": self.totals.to_dict(),
        }

    def queue(self, name: str) -> QueueStat | None:
        """The row of ``name``, or ``None`` if that queue was never seen."""
        for q in self.queues:
            if q.queue == name:
                return q
        return None


@dataclass(frozen=True, slots=True)
class ThroughputSample:
    """One ``Sampler`` reading for one queue.

    ``at`` is the sampler clock's time of the reading, ``processed`` the queue's cumulative
    processed count then, ``rate`` jobs/min since the previous reading (0.0 for the first).
    """

    at: float
    processed: int
    rate: float
