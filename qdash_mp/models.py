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
    "EMPTY_SUMMARY",
    "PAGE_SIZE",
    "ActiveJob",
    "FailedJob",
    "Job",
    "JobView",
    "LatencySummary",
    "QueueStat",
    "StatsView",
    "ThroughputSample",
    "TrackedJob",
    "WorkerView",
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
class LatencySummary:
    """``count`` values and their percentiles / maximum in seconds (``None`` if count is 0).

    Built from a histogram by ``qdash_mp.histogram.summary`` (its error bound is there).
    """

    count: int
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, int | float | None]:
        """The JSON shape of DESIGN.md (``{"count", "p50", ..., "max"}``)."""
        return {
            "count": self.count,
            "p50": self.p50,
            "p90": self.p90,
            "p95": self.p95,
            "p99": self.p99,
            "max": self.max,
        }

    as_dict = to_dict


EMPTY_SUMMARY = LatencySummary(0)
"""No values: count 0, every percentile ``None``."""


@dataclass(frozen=True, slots=True)
class QueueStat:
    """Counters of one queue (or of all, for totals).

    ``pending`` is ``pushed - processed - failed`` floored at 0; ``throughput`` is processed
    jobs per second over the rolling window. ``active`` is jobs started and not finished
    now; ``runtime`` and ``wait`` summarize the lifetime runtime and wait-time histograms.
    """

    queue: str
    pushed: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    pending: int = 0
    throughput: float = 0.0
    active: int = 0
    runtime: LatencySummary = EMPTY_SUMMARY
    wait: LatencySummary = EMPTY_SUMMARY

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
            "active": self.active,
            "runtime": self.runtime.to_dict(),
            "wait": self.wait.to_dict(),
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


@dataclass(frozen=True, slots=True)
class ActiveJob:
    """A job a worker is running now (``started_at`` Unix seconds)."""

    queue: str
    id: str
    name: str
    started_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.id,
            "name": self.name,
            "started_at": self.started_at,
        }


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One client of the collector: who it is, what it reported on, what it runs now.

    ``state`` is ``"connected"`` or ``"gone"`` (disconnected, kept listed for a while; its
    active jobs no longer count). Times are Unix seconds.
    """

    id: str
    pid: int
    host: str
    name: str
    queues: tuple[str, ...]
    connected_at: float
    last_seen: float
    active: tuple[ActiveJob, ...]
    state: str
    can_requeue: bool

    def to_dict(self) -> dict[str, Any]:
        """An entry of ``/queues/api/workers``."""
        return {
            "id": self.id,
            "pid": self.pid,
            "host": self.host,
            "name": self.name,
            "queues": list(self.queues),
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "active": [job.to_dict() for job in self.active],
            "state": self.state,
            "can_requeue": self.can_requeue,
        }


@dataclass(frozen=True, slots=True)
class TrackedJob:
    """A tracked job's row (pending or recent lists): ``state`` is ``"pending"``,
    ``"active"``, ``"processed"`` or ``"failed"``; times are Unix seconds, ``runtime``
    seconds."""

    id: str
    queue: str
    name: str
    state: str
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    runtime: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue": self.queue,
            "name": self.name,
            "state": self.state,
            "enqueued_at": self.enqueued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "runtime": self.runtime,
        }
