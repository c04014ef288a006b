"""TEMPORARY stand-ins for L2's models (ActiveJob, WorkerView, TrackedJob) until w2/l2 lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
