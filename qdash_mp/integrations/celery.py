"""Celery: ``install(app)`` connects qdash_mp to Celery's signals, in producers and workers.

``install(app, socket_path=None)`` once where the app is defined (the module every producer
and worker imports). Events and where they come from:

==========================  ===============================  ==================================
qdash_mp event              Celery signal                    process
==========================  ===============================  ==================================
pushed                      ``before_task_publish``          producer (first publish only)
started                     ``task_prerun``                  pool child
processed (runtime)         ``task_success`` (timed from     pool child
                            ``task_prerun`` by the client)
failed (error, traceback)   ``task_failure``                 pool child; parent for a lost
                                                             worker or a hard time limit
retried                     ``task_retry``                   pool child
==========================  ===============================  ==================================

Prefork children leave through ``os._exit`` (billiard), past ``atexit``: the client is closed
(flushed) on ``worker_process_shutdown``, else every ``max_tasks_per_child`` recycle would lose
the counts of its last flush interval. A dashboard retry calls ``app.send_task`` with the
recorded name, args and kwargs on the recorded queue; it is routed to the worker's client for
the queues that worker consumes (registered on ``celeryd_after_setup``, before the pool forks).
A library retry republishes with ``retries > 0``; it counts as retried, not as pushed again.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from qdash_mp.integrations._common import (
    ProcessClient,
    in_dashboard_retry,
    job_args,
    make_job,
)
from qdash_mp.models import Job

__all__ = ["CeleryAdapter", "install"]


class CeleryAdapter:
    """The signal receivers for one Celery ``app``; ``install`` makes and connects one."""

    def __init__(self, app: Any, socket_path: str | os.PathLike[str] | None = None) -> None:
        self.app = app
        self.clients = ProcessClient(socket_path)

    # ---------------------------------------------------------------- helpers

    def _queue_of(self, task: Any, request: Any = None) -> str:
        # ``task.request`` is a property reading a thread-local stack (~0.6 us): a receiver
        # reads it once and passes it here.
        if request is None:
            request = getattr(task, "request", None)
        info = getattr(request, "delivery_info", None)
        queue = (info.get("routing_key") if info else None) or getattr(task, "queue", None)
        return str(queue or self.app.conf.task_default_queue)

    def requeue(self, job: Job) -> None:
        """Send ``job`` again through Celery (a dashboard retry); raises if Celery refuses."""
        args, kwargs, queue = job_args(job)
        self.app.send_task(job.name, args=args, kwargs=kwargs, queue=queue)

    def connect(self) -> CeleryAdapter:
        """Connect the receivers to Celery's signals (strong references); returns ``self``."""
        signals: Any = importlib.import_module("celery.signals")

        signals.before_task_publish.connect(self.before_task_publish, weak=False)
        signals.celeryd_after_setup.connect(self.after_setup, weak=False)
        signals.task_prerun.connect(self.task_prerun, weak=False)
        signals.task_success.connect(self.task_success, weak=False)
        signals.task_failure.connect(self.task_failure, weak=False)
        signals.task_retry.connect(self.task_retry, weak=False)
        signals.worker_process_shutdown.connect(self.process_shutdown, weak=False)
        signals.worker_shutdown.connect(self.worker_shutdown, weak=False)
        return self

    # ---------------------------------------------------------------- receivers

    def before_task_publish(
        self,
        sender: Any = None,
        headers: Any = None,
        routing_key: Any = None,
        body: Any = None,
        **_: Any,
    ) -> None:
        headers = headers or {}
        if headers.get("retries") or in_dashboard_retry():
            return  # a library retry (counted by task_retry) or a dashboard one (collector)
        queue = routing_key or self.app.conf.task_default_queue
        self.clients.get().on_pushed(str(queue))

    def after_setup(self, sender: Any = None, instance: Any = None, **_: Any) -> None:
        """In the worker's parent, before the pool forks: the requeue route of its queues."""
        self.clients.configure(self.requeue, self._consumed_queues(instance))

    def _consumed_queues(self, instance: Any) -> list[str]:
        app = getattr(instance, "app", None) or self.app
        try:
            names = list(app.amqp.queues.consume_from or app.amqp.queues)
        except Exception:  # noqa: BLE001 -- fall back to the default queue
            names = []
        return [str(n) for n in names] or [str(app.conf.task_default_queue)]

    def task_prerun(self, sender: Any = None, task_id: Any = None, **kw: Any) -> None:
        # The started job carries no args/kwargs (a failure builds them) and the client
        # times the run from here to the end report of the same id.
        request = sender.request
        job = Job(str(task_id), sender.name, None, (request.retries or 0) + 1)
        self.clients.get().on_started(self._queue_of(sender, request), job)

    def task_success(self, sender: Any = None, **_: Any) -> None:
        request = sender.request
        done = Job(str(request.id), sender.name)  # ends the active entry on_started made
        self.clients.get().on_processed(self._queue_of(sender, request), done)

    def task_failure(
        self,
        sender: Any = None,
        task_id: Any = None,
        exception: Any = None,
        args: Any = None,
        kwargs: Any = None,
        **_: Any,
    ) -> None:
        # In the pool child the client times the run it saw start; in the parent (a lost
        # worker, a hard time limit) no start was seen here and no runtime is reported.
        request = getattr(sender, "request", None)
        queue = self._queue_of(sender, request)
        retries = (getattr(request, "retries", 0) or 0) if request is not None else 0
        name = getattr(sender, "name", "") or ""
        job = make_job(task_id, name, args, kwargs, queue, int(retries) + 1)
        error = exception if isinstance(exception, BaseException) else str(exception)
        self.clients.get().on_failed(queue, job, error)

    def task_retry(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        name = getattr(sender, "name", "") or ""
        # This attempt ends here (the retry may run in another pool child): not active any more.
        job = Job(str(task_id), name) if task_id else None
        self.clients.get().on_retried(self._queue_of(sender, request), job)

    def process_shutdown(self, **_: Any) -> None:
        """A pool child is about to ``os._exit``: deliver what it counted."""
        self.clients.close(5.0)

    def worker_shutdown(self, **_: Any) -> None:
        self.clients.close(5.0)


def install(app: Any, socket_path: str | os.PathLike[str] | None = None) -> CeleryAdapter:
    """Report ``app``'s tasks to the collector at ``socket_path`` (default: the standard one)."""
    return CeleryAdapter(app, socket_path).connect()
