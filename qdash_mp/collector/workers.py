"""The workers registry: every client the collector has heard from, connected or recently gone.

Pure bookkeeping (no I/O, times passed in): ``connections`` calls ``connect`` after a
HELLO, ``batch`` for each BATCH (queues, gauges, active jobs), ``seen`` for any other frame and
``disconnect`` when the connection ends; the collector's tick calls ``expire``.

A disconnected worker stays listed as ``gone`` for ``retention`` seconds, but its active
gauges and jobs are dropped at once: a ``kill -9``'d worker's jobs do not stay active. A
client that reconnects with the same id is ``connected`` again (its next batch after WELCOME
resends its gauges). Two connections with one client id (a reconnect racing the old
connection's end) are told apart by a token, so the old one's end does not mark the new one gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qdash_mp.models import ActiveJob, WorkerView

__all__ = ["MAX_GONE", "MAX_QUEUES_PER_WORKER", "Workers"]

MAX_QUEUES_PER_WORKER = 1000
"""Queue names remembered per worker (more are not listed; counts are unaffected)."""

MAX_GONE = 10_000
"""Gone workers kept at most (oldest dropped first), whatever the retention."""

JobRow = tuple[str, str, str, float]


@dataclass(slots=True)
class _Worker:
    id: str
    pid: int
    host: str
    name: str
    can_requeue: bool
    connected_at: float
    last_seen: float
    token: int
    queues: dict[str, None] = field(default_factory=dict)  # ordered set
    gauges: dict[str, int] = field(default_factory=dict)
    jobs: tuple[ActiveJob, ...] = ()
    gone_at: float | None = None


class Workers:
    """Connected and recently gone workers by client id; see the module docstring."""

    def __init__(self, retention: float = 600.0) -> None:
        self.retention = retention
        self._w: dict[str, _Worker] = {}
        self._tokens = 0

    def connect(
        self, client_id: str, pid: int, host: str, name: str, can_requeue: bool, now: float
    ) -> int:
        """A HELLO was accepted; returns the token ``disconnect`` must be given."""
        self._tokens += 1
        old = self._w.pop(client_id, None)
        w = _Worker(client_id, pid, host, name, can_requeue, now, now, self._tokens)
        if old is not None and old.pid == pid and old.host == host:
            w.queues = old.queues  # the same process reconnecting keeps its queue list
        self._w[client_id] = w  # re-inserted: dict order is "most recently connected last"
        return w.token

    def seen(self, client_id: str, now: float) -> None:
        """Any frame from ``client_id``."""
        w = self._w.get(client_id)
        if w is not None and w.gone_at is None:
            w.last_seen = now

    def batch(
        self,
        client_id: str,
        now: float,
        queues: Iterable[str],
        active: Mapping[str, int] | None,
        jobs: Iterable[JobRow] | None,
    ) -> None:
        """A BATCH: the queues it reported on; ``active``/``jobs`` replace the gauges/jobs
        when not ``None`` (absent on the wire = unchanged)."""
        w = self._w.get(client_id)
        if w is None or w.gone_at is not None:
            return
        w.last_seen = now
        qs = w.queues
        for q in queues:
            if q not in qs and len(qs) < MAX_QUEUES_PER_WORKER:
                qs[q] = None
        if active is not None:
            w.gauges = {q: n for q, n in active.items() if n > 0}
            for q in w.gauges:
                if q not in qs and len(qs) < MAX_QUEUES_PER_WORKER:
                    qs[q] = None
        if jobs is not None:
            w.jobs = tuple(ActiveJob(q, i, n, t) for q, i, n, t in jobs)

    def disconnect(self, client_id: str, token: int, now: float) -> None:
        """The connection with ``token`` ended: the worker is gone, its jobs stop counting."""
        w = self._w.get(client_id)
        if w is None or w.token != token or w.gone_at is not None:
            return
        w.gone_at = now
        w.gauges = {}
        w.jobs = ()
        gone = [k for k, v in self._w.items() if v.gone_at is not None]
        for k in gone[: max(0, len(gone) - MAX_GONE)]:
            del self._w[k]

    def expire(self, now: float) -> int:
        """Forget workers gone for longer than ``retention``; returns how many."""
        old = [
            k
            for k, w in self._w.items()
            if w.gone_at is not None and w.gone_at + self.retention <= now
        ]
        for k in old:
            del self._w[k]
        return len(old)

    def active_by_queue(self) -> dict[str, int]:
        """Sum of the connected workers' active gauges per queue."""
        out: dict[str, int] = {}
        for w in self._w.values():
            for q, n in w.gauges.items():
                out[q] = out.get(q, 0) + n
        return out

    def __len__(self) -> int:
        return len(self._w)

    def views(self) -> list[WorkerView]:
        """Connected workers first (by connection time), then gone ones (most recent first)."""
        conn = sorted((w for w in self._w.values() if w.gone_at is None), key=_connected)
        gone = sorted((w for w in self._w.values() if w.gone_at is not None), key=_gone_at)
        return [_view(w) for w in conn + gone[::-1]]


def _connected(w: _Worker) -> float:
    return w.connected_at


def _gone_at(w: _Worker) -> float:
    return w.gone_at or 0.0


def _view(w: _Worker) -> WorkerView:
    return WorkerView(
        id=w.id,
        pid=w.pid,
        host=w.host,
        name=w.name,
        queues=tuple(w.queues),
        connected_at=w.connected_at,
        last_seen=w.gone_at if w.gone_at is not None else w.last_seen,
        active=tuple(sorted(w.jobs, key=_started)),
        state="connected" if w.gone_at is None else "gone",
        can_requeue=w.can_requeue,
    )


def _started(j: ActiveJob) -> float:
    return j.started_at
