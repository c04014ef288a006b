"""What every adapter shares: the payload shape and a per-process client."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from qdash_mp.client import Client
from qdash_mp.errors import ConfigError
from qdash_mp.models import Job

__all__ = [
    "FLUSH_ENV",
    "FLUSH_INTERVAL",
    "ProcessClient",
    "flush_interval",
    "in_dashboard_retry",
    "job_args",
    "make_job",
    "payload_of",
]

log = logging.getLogger("qdash_mp.integrations")

Requeue = Callable[[Job], object]

FLUSH_INTERVAL = 1.0
"""Seconds between an adapter client's batches (``Client``'s own default is 0.1 s).

A worker runs tasks back to back, and every batch costs the sender thread and the collector
~0.3 ms each (~0.6 ms each on a slow 2-vCPU VM), on the worker's CPU too when they share
it: a cost per second of a busy worker, whatever its tasks. The dashboard refreshes once a
second; one batch a second keeps it live within that. Measured (``docs/integrations.md``),
0.1 -> 0.5 s took ~1 % off taskiq's per-task cost with the adapter; 0.5 -> 1 s halved the
~1.2 ms a second that a no-op Dramatiq worker paid for its batches.
``ProcessClient(..., flush_interval=...)`` sets another, and so does ``$QDASH_FLUSH_INTERVAL``
(``FLUSH_ENV``) for every adapter of the process: a large fleet raises it to spare the
collector, and the benchmark stretches it while a worker runs a share of the time."""

FLUSH_ENV = "QDASH_FLUSH_INTERVAL"


def flush_interval() -> float:
    """``$QDASH_FLUSH_INTERVAL`` in seconds if set, else ``FLUSH_INTERVAL``.

    Raises ``ConfigError`` (when the adapter is made: at the worker's start) for anything but
    a number of seconds in (0, 3600].
    """
    text = os.environ.get(FLUSH_ENV, "").strip()
    if not text:
        return FLUSH_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 3600:  # NaN fails too
        raise ConfigError(
            f"${FLUSH_ENV} must be the seconds between a worker's batches to the collector, "
            f"a number in (0, 3600] such as 0.5; it is {text!r}"
        )
    return value


def payload_of(
    args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, queue: str
) -> dict[str, Any]:
    """The failed-job payload ``{"args": [...], "kwargs": {...}, "queue": name}``.

    It is what a dashboard retry sends again; the queue is in it because a requeue callback
    is handed the job alone, and a job sent to a named queue must go back there.
    """
    return {"args": list(args or ()), "kwargs": dict(kwargs or {}), "queue": queue}


def job_args(job: Job) -> tuple[list[Any], dict[str, Any], str | None]:
    """``(args, kwargs, queue)`` back from a payload made by ``payload_of``.

    A payload the client could not send (not msgpack data) arrives as a text; a retry of it
    would run the task with wrong arguments, so it is refused.
    """
    payload = job.payload
    if not isinstance(payload, dict) or not isinstance(payload.get("args", []), list):
        raise ValueError(f"job {job.id!r} has no args/kwargs payload to retry with: {payload!r}")
    kwargs = payload.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"job {job.id!r} has kwargs that are not a mapping: {kwargs!r}")
    queue = payload.get("queue")
    return (
        list(payload.get("args") or []),
        {str(k): v for k, v in kwargs.items()},
        queue if isinstance(queue, str) and queue else None,
    )


def make_job(
    id: object,
    name: str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    queue: str,
    attempts: int = 0,
    enqueued_at: float | None = None,
) -> Job:
    """A ``Job`` whose payload ``job_args`` turns back into the call.

    ``attempts`` counts runs, this one included (every adapter: the library's retries + 1).
    """
    return Job(
        id=str(id),
        name=name,
        payload=payload_of(args, kwargs, queue),
        attempts=attempts,
        enqueued_at=enqueued_at,
    )


_retrying = threading.local()


def in_dashboard_retry() -> bool:
    """True while this thread runs a dashboard retry's requeue callback.

    The collector counts that job as pushed (and retried) itself once the requeue succeeded,
    so an adapter's pushed hook, which the library's enqueue calls on this same thread, must
    not count it again.
    """
    return getattr(_retrying, "active", False)


def _as_dashboard_retry(requeue: Requeue) -> Requeue:
    def run(job: Job) -> object:
        _retrying.active = True
        try:
            return requeue(job)
        finally:
            _retrying.active = False

    return run


class ProcessClient:
    """One ``Client`` per process, made on first use and remade in a process that forked.

    ``Client`` already gives a forked child a fresh identity; this only decides *when* one is
    made (lazily, so producers that never enqueue and ``import`` time pay nothing) and with
    which requeue route. ``configure`` sets the route for the client made next (a worker
    calls it before it forks its children, so they inherit the route).
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, **client_kw: Any):
        self.socket_path = socket_path
        if "flush_interval" not in client_kw:
            client_kw["flush_interval"] = flush_interval()
        self.client_kw = client_kw
        self._requeue: Requeue | None = None
        self._queues: list[str] | None = None
        self._client: Client | None = None
        self._inherited: Client | None = None  # see ``drop``
        self._lock = threading.Lock()

    def configure(self, requeue: Requeue, queues: Iterable[str]) -> Client:
        """Route dashboard retries of ``queues`` to ``requeue`` and connect now.

        A worker calls it at start: its client must be connected before any job runs, or
        the dashboard would find no route for its queues. A client made before is replaced.
        """
        with self._lock:
            self._requeue = requeue
            self._queues = sorted(set(queues))
            old, self._client = self._client, None
        if old is not None:
            old.close(2.0)
        return self.get()

    def get(self) -> Client:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                kw = dict(self.client_kw)
                if self._requeue is not None:
                    kw["requeue"] = _as_dashboard_retry(self._requeue)
                    kw["requeue_queues"] = self._queues
                self._client = Client(self.socket_path, **kw)
            return self._client

    def peek(self) -> Client | None:
        return self._client

    def drop(self) -> None:
        """Forget the client without closing it (a child's inert copy); the next use makes one.

        The copy stays referenced: freeing it in a short-lived child would write to pages
        it shares with the parent, each then copied.
        """
        if self._client is not None:
            self._inherited = self._client
        self._client = None
        self._requeue = None
        self._queues = None

    def close(self, timeout: float = 5.0) -> bool:
        with self._lock:
            client, self._client = self._client, None
        return client.close(timeout) if client is not None else True
