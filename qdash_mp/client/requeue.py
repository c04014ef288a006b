"""REQUEUE requests from the collector: which queues a client takes, and running the callback.

The callback runs in a thread of its own, so a slow re-enqueue never holds up ACKs; its
answers wait in ``results`` for the sender thread, which sends each one on the connection
its request came on (or logs that it cannot: that connection is gone, and the collector has
already treated the request as failed).
"""

from __future__ import annotations

import collections
import queue as queue_mod
import threading
from collections.abc import Callable, Iterable

from qdash_mp.errors import ConfigError
from qdash_mp.failed import describe_error
from qdash_mp.models import Job
from qdash_mp.protocol import ALL_QUEUES, MAX_NAME

__all__ = ["RequeueFn", "Requeuer", "requeue_list"]

RequeueFn = Callable[[Job], object]


def requeue_list(requeue: RequeueFn | None, queues: Iterable[str] | None) -> tuple[str, ...] | None:
    """The queues announced in HELLO (``("*",)``: all), or ``None`` without a callback."""
    if requeue is None:
        if queues is not None:
            raise ConfigError("requeue_queues needs a requeue callback")
        return None
    if not callable(requeue):
        raise ConfigError(f"requeue must be callable, not {type(requeue).__name__}")
    if queues is None:
        return (ALL_QUEUES,)
    if isinstance(queues, str):
        raise ConfigError("requeue_queues must be a list of queue names, not a str")
    names = tuple(queues)
    if not names:
        raise ConfigError("requeue_queues must not be empty (None means every queue)")
    for q in names:
        if not isinstance(q, str) or not 1 <= len(q) <= MAX_NAME:
            raise ConfigError(f"invalid queue name in requeue_queues: {q!r}")
    return tuple(str.__str__(q) for q in names)


def refusal(queues: tuple[str, ...] | None, queue: str) -> str | None:
    """Why a client announcing ``queues`` does not requeue ``queue`` (``None``: it does)."""
    if queues is None:
        return "this client has no requeue callback"
    if ALL_QUEUES not in queues and queue not in queues:
        return f"this client does not requeue {queue!r}"
    return None


class Requeuer:
    """Runs ``requeue(job)`` in its own thread (started on first use); answers in ``results``.

    A result is ``(conn_gen, request_id, ok, error)``; ``wake()`` is called after each one.
    """

    def __init__(self, requeue: RequeueFn, wake: Callable[[], None], name: str) -> None:
        self._requeue = requeue
        self._wake = wake
        self._name = name
        self._jobs: queue_mod.SimpleQueue[tuple[int, int, Job] | None] | None = None
        self.results: collections.deque[tuple[int, int, bool, str]] = collections.deque()

    def submit(self, conn_gen: int, request_id: int, job: Job) -> None:
        if self._jobs is None:
            self._jobs = queue_mod.SimpleQueue()
            threading.Thread(
                target=self._run, args=(self._jobs,), name=self._name, daemon=True
            ).start()
        self._jobs.put((conn_gen, request_id, job))

    def stop(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)

    def _run(self, jobs: queue_mod.SimpleQueue[tuple[int, int, Job] | None]) -> None:
        while (item := jobs.get()) is not None:
            conn_gen, request_id, job = item
            try:
                self._requeue(job)
            except Exception as exc:  # noqa: BLE001 -- any failure is the answer
                text, _trace = describe_error(exc)
                self.results.append((conn_gen, request_id, False, text[:4096]))
            else:
                self.results.append((conn_gen, request_id, True, ""))
            self._wake()
