"""REQUEUE requests from the collector: which queues a client takes, and running the callback.

The callback runs in a thread of its own, so a slow re-enqueue never holds up ACKs; its
answers wait in ``results`` for the sender thread, which sends each one on the connection
its request came on (or logs that it cannot: that connection is gone, and the collector has
already treated the request as failed).
"""

from __future__ import annotations

import collections
import logging
import queue as queue_mod
import threading
from collections.abc import Callable, Iterable

from qdash_mp.client.session import Session
from qdash_mp.errors import ConfigError
from qdash_mp.failed import describe_error
from qdash_mp.models import Job
from qdash_mp.wire import ALL_QUEUES, MAX_NAME, Requeue, RequeueResult, encode

__all__ = ["RequeueFn", "Requeuer", "refusal", "requeue_list"]

log = logging.getLogger("qdash_mp.client.requeue")

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
    """Answers REQUEUE requests: refuses what this client does not take, runs ``requeue(job)``
    in its own thread (started on first use) for the rest, and sends each answer on the
    connection its request came on.
    """

    def __init__(
        self,
        requeue: RequeueFn | None,
        queues: tuple[str, ...] | None,
        wake: Callable[[], None],
        name: str,
    ) -> None:
        self._requeue = requeue
        self._queues = queues
        self._wake = wake
        self._name = name
        self._jobs: queue_mod.SimpleQueue[tuple[int, int, Job] | None] | None = None
        # (conn_gen, request_id, ok, error), appended by the callback's thread.
        self._results: collections.deque[tuple[int, int, bool, str]] = collections.deque()

    def handle(self, msg: Requeue, session: Session) -> None:
        """(Sender thread) A REQUEUE arrived on ``session``'s connection."""
        why = refusal(self._queues, msg.queue)
        if why is not None or self._requeue is None:
            _answer(session, msg.request_id, False, why or "this client has no requeue callback")
            return
        if self._jobs is None:
            self._jobs = queue_mod.SimpleQueue()
            threading.Thread(
                target=self._run, args=(self._requeue, self._jobs), name=self._name, daemon=True
            ).start()
        self._jobs.put((session.conn_gen, msg.request_id, msg.failed.job()))

    def deliver(self, session: Session) -> None:
        """(Sender thread) Send the answers ready so far."""
        results = self._results
        while results:
            conn_gen, request_id, ok, error = results.popleft()
            if conn_gen == session.conn_gen and session.sock is not None:
                _answer(session, request_id, ok, error)
            else:
                log.warning(
                    "qdash_mp client: requeue answer %d (ok=%s) not delivered: the "
                    "connection it came on is gone",
                    request_id,
                    ok,
                )

    def stop(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)

    def _run(
        self, requeue: RequeueFn, jobs: queue_mod.SimpleQueue[tuple[int, int, Job] | None]
    ) -> None:
        while (item := jobs.get()) is not None:
            conn_gen, request_id, job = item
            try:
                requeue(job)
            except Exception as exc:  # noqa: BLE001 -- any failure is the answer
                text, _trace = describe_error(exc)
                self._results.append((conn_gen, request_id, False, text[:4096]))
            else:
                self._results.append((conn_gen, request_id, True, ""))
            self._wake()


def _answer(session: Session, request_id: int, ok: bool, error: str) -> None:
    session.send(encode(RequeueResult(request_id=request_id, ok=ok, error=error)))
