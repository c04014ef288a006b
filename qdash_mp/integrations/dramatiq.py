"""Dramatiq: ``QdashMiddleware``, added before ``Retries`` so it sees the retry decision.

``broker.add_middleware(QdashMiddleware(), before=Retries)``. Events:

==========================  ===============================================================
qdash_mp event              Dramatiq hook
==========================  ===============================================================
pushed                      ``after_enqueue`` of a new message (not a retry: ``"retries"`` in
                            its options; not a delayed message moved to its queue: ``eta``)
started                     ``before_process_message`` (the time is taken here)
processed (runtime)         ``after_process_message`` without an exception
retried                     ``after_process_message`` with an exception, ``Retries`` having
                            re-enqueued it (``message.failed`` not set)
failed                      ``after_process_message`` with ``message.failed`` (retries
                            exhausted, or ``throws``); ``after_skip_message`` when failed
==========================  ===============================================================

``emit_after`` walks the middleware list backwards, so a middleware placed *before*
``Retries`` runs its ``after_*`` hooks after ``Retries`` decided: ``message.failed`` is then
final. Worker processes are forked (``forkserver`` on Python 3.14+): the client is made in
``after_process_boot``, in the process that uses it, and registers the requeue route of the
broker's declared queues there; hooks run on the worker's threads (``Client`` is thread-safe).
A dashboard retry is ``broker.enqueue(Message(queue, actor, args, kwargs, options={}))``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import dramatiq
from dramatiq.common import q_name

from qdash_mp.integrations._common import (
    ProcessClient,
    in_dashboard_retry,
    job_args,
    make_job,
)
from qdash_mp.models import Job

__all__ = ["QdashMiddleware"]

log = logging.getLogger("qdash_mp.integrations.dramatiq")


class QdashMiddleware(dramatiq.Middleware):  # type: ignore[misc,unused-ignore]
    """Reports a Dramatiq broker's messages to qdash_mp; add it ``before=Retries``."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None) -> None:
        self.clients = ProcessClient(socket_path)
        self._broker: Any = None
        # Per task, from before_process_message to its end hook (same worker thread; single
        # dict operations, atomic under the GIL and thread-safe in free-threaded builds):
        # message id -> (queue, job). Queue names as q_name gives them, by queue_name.
        self._runs: dict[str, tuple[str, Job]] = {}
        self._queues: dict[str, str] = {}

    def _queue(self, queue_name: str) -> str:
        queue = self._queues.get(queue_name)
        if queue is None:  # a few per worker: q_name strips the delay queue's suffix
            queue = self._queues[queue_name] = q_name(queue_name)
        return queue

    # ---------------------------------------------------------------- process life

    def after_process_boot(self, broker: Any) -> None:
        self._broker = broker
        names = [type(m).__name__ for m in broker.middleware]
        if "Retries" in names and names.index("Retries") < names.index(type(self).__name__):
            log.error(
                "qdash_mp: QdashMiddleware was added after Retries; failed jobs will be counted "
                "as retried. Use broker.add_middleware(QdashMiddleware(), before=Retries)."
            )
        queues = [q for q in broker.get_declared_queues() if q == q_name(q)]
        self.clients.configure(self.requeue, queues)

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.clients.close(5.0)

    def requeue(self, job: Job) -> None:
        """A dashboard retry: a new message through the broker; raises if it refuses."""
        args, kwargs, queue = job_args(job)
        broker = self._broker or dramatiq.get_broker()
        actor = broker.get_actor(job.name)  # ActorNotFound if this worker lacks it
        message: Any = dramatiq.Message(
            queue_name=queue or actor.queue_name,
            actor_name=job.name,
            args=tuple(args),
            kwargs=kwargs,
            options={},
        )
        broker.enqueue(message)

    # ---------------------------------------------------------------- messages

    def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        options = message.options
        if "retries" in options or (not delay and "eta" in options) or in_dashboard_retry():
            # a library retry (counted as retried), a delayed message moved on, or a
            # dashboard retry (the collector counts it)
            return
        self.clients.get().on_pushed(q_name(message.queue_name))

    def before_process_message(self, broker: Any, message: Any) -> None:
        # The client times the run from here to the finish hook of the same id (in this
        # thread); the args/kwargs payload is built only if the message fails. The job is
        # kept for the end hook, which runs for every task too.
        queue = self._queue(message.queue_name)
        runs = message.options.get("retries")
        job = Job(
            message.message_id,
            message.actor_name,
            None,
            int(runs) + 1 if runs else 1,
            message.message_timestamp / 1000.0,
        )
        self._runs[job.id] = (queue, job)
        self.clients.get().on_started(queue, job)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        run = self._runs.pop(message.message_id, None)
        if run is None:  # not started here (a middleware before this one raised)
            run = self._queue(message.queue_name), Job(message.message_id, message.actor_name)
        queue, job = run
        client = self.clients.get()
        if exception is None:
            client.on_processed(queue, job)
        elif getattr(message, "failed", False):
            client.on_failed(queue, _job_of(message, queue), exception)
        else:  # the attempt ends here; the next may run in another process
            client.on_retried(queue, job)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self._runs.pop(message.message_id, None)
        if getattr(message, "failed", False):
            queue = self._queue(message.queue_name)
            error = "skipped by a middleware (e.g. AgeLimit) and failed"
            self.clients.get().on_failed(queue, _job_of(message, queue), error)


def _job_of(message: Any, queue: str, runs: int | None = None) -> Job:
    if runs is None:
        # After a failure Retries has bumped "retries" already: it equals the runs made.
        runs = int(message.options.get("retries", 0) or 0)
    return make_job(
        message.message_id,
        message.actor_name,
        message.args,
        message.kwargs,
        queue,
        max(runs, 1),
        message.message_timestamp / 1000.0,
    )
