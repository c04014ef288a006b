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
broker's declared queues there (``before_worker_boot`` when a program starts a ``Worker``
itself). The message hooks, on the worker's threads, only append the message and the time
to a ``RunLog`` that the client's sender thread replays as hooks (``qdash_mp.client.runlog``:
in a busy worker that is ~5x cheaper than building the job there). A dashboard retry is
``broker.enqueue(Message(queue, actor, args, kwargs, options={}))``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import dramatiq
from dramatiq.common import q_name

from qdash_mp.client.runlog import DROPPED, FAILED, PROCESSED, RETRIED, RunLog
from qdash_mp.integrations._common import (
    ProcessClient,
    in_dashboard_retry,
    job_args,
    make_job,
)
from qdash_mp.models import Job

__all__ = ["QdashMiddleware"]

log = logging.getLogger("qdash_mp.integrations.dramatiq")

_mono = time.monotonic


class QdashMiddleware(dramatiq.Middleware):  # type: ignore[misc,unused-ignore]
    """Reports a Dramatiq broker's messages to qdash_mp; add it ``before=Retries``."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None) -> None:
        # The worker's hooks only append to the run log (the cheapest code to run cold in a
        # busy worker, qdash_mp.client.runlog); the client's sender thread replays it.
        self._log = RunLog(self._describe)
        self.clients = ProcessClient(socket_path, run_log=self._log)
        self._broker: Any = None
        self._queues: dict[str, str] = {}  # queue_name -> q_name(queue_name) (sender thread)

    def _describe(self, message: Any, full: bool) -> tuple[str, Job]:
        """(Sender thread) The queue and job of a recorded message; ``full``: with payload."""
        # The worker hands middleware a MessageProxy, whose __getattr__ forwards each read to
        # the Message it wraps: ~0.6 us a read against 0.05 us on the Message itself.
        message = getattr(message, "_message", message)
        queue = self._queues.get(message.queue_name)
        if queue is None:  # a few per worker: q_name strips the delay queue's suffix
            queue = self._queues[message.queue_name] = q_name(message.queue_name)
        if full:
            return queue, _job_of(message, queue)
        runs = message.options.get("retries")
        return queue, Job(
            message.message_id,
            message.actor_name,
            None,
            int(runs) + 1 if runs else 1,
            message.message_timestamp / 1000.0,
        )

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

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        # A Worker started in the program's own process (tests with a StubBroker) gets no
        # process_boot: its client is made here, so the run log has a client to replay it.
        if self.clients.peek() is None:
            self.after_process_boot(broker)

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
        # Times and ends are taken here; the job, its queue and its payload (if it fails)
        # are built by _describe on the sender thread, from the same message.
        self._log.records.append((message, _mono()))

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if exception is None:
            self._log.records.append((message, _mono(), PROCESSED, None))
        elif getattr(message, "failed", False):
            self._log.records.append((message, _mono(), FAILED, exception))
        else:  # the attempt ends here; the next may run in another process
            self._log.records.append((message, _mono(), RETRIED, None))

    def after_skip_message(self, broker: Any, message: Any) -> None:
        if getattr(message, "failed", False):
            error = "skipped by a middleware (e.g. AgeLimit) and failed"
            self._log.records.append((message, _mono(), FAILED, error))
        else:  # started here if a middleware after this one skipped it: no longer active
            self._log.records.append((message, _mono(), DROPPED, None))


def _job_of(message: Any, queue: str) -> Job:
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
