"""Huey: ``install(huey)`` connects qdash_mp to Huey's signals and startup hooks.

==========================  ===============================================================
qdash_mp event              Huey signal
==========================  ===============================================================
pushed                      ``SIGNAL_ENQUEUED``, except a retry being re-enqueued and a
                            scheduled task the consumer moves to the queue when due
started                     ``SIGNAL_EXECUTING`` (the time is taken here, per task id)
processed (runtime)         ``SIGNAL_COMPLETE``
retried                     ``SIGNAL_RETRYING`` (the task had retries left)
failed                      ``SIGNAL_ERROR`` / ``SIGNAL_TIMEOUT`` / ``SIGNAL_LOCKED`` /
                            ``SIGNAL_CANCELED`` with no retries left
==========================  ===============================================================

Not counted: revoked and expired tasks (never run), and a task interrupted by a consumer
shutdown. The consumer's workers (threads, processes or greenlets) get the client from an
``on_startup`` hook, once per process, which also registers the requeue route of this Huey's
queue (``huey.name``); a dashboard retry is ``huey.enqueue(TaskClass(args, kwargs))`` with
the task class found in Huey's registry by the recorded name (``module.task``).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from qdash_mp.integrations._common import (
    ProcessClient,
    in_dashboard_retry,
    job_args,
    make_job,
)
from qdash_mp.models import Job

__all__ = ["HueyAdapter", "install"]

_RETRY_FLAG = "_qdash_retrying"


class HueyAdapter:
    """The signal receivers for one ``Huey``; ``install`` makes and connects one."""

    def __init__(self, huey: Any, socket_path: str | os.PathLike[str] | None = None) -> None:
        self.huey = huey
        self.queue = str(huey.name)
        self.clients = ProcessClient(socket_path)
        self._lock = threading.Lock()
        self._configured_pid = 0
        self._names: dict[type, str] = {}

    def connect(self) -> HueyAdapter:
        s: Any = importlib.import_module("huey.signals")

        h = self.huey
        h.signal(s.SIGNAL_ENQUEUED)(self.enqueued)
        h.signal(s.SIGNAL_EXECUTING)(self.executing)
        h.signal(s.SIGNAL_COMPLETE)(self.complete)
        h.signal(s.SIGNAL_RETRYING)(self.retrying)
        h.signal(s.SIGNAL_ERROR, s.SIGNAL_TIMEOUT, s.SIGNAL_LOCKED, s.SIGNAL_CANCELED)(self.failed)
        h.on_startup("qdash_mp")(self.startup)
        h.on_shutdown("qdash_mp")(self.shutdown)
        return self

    # ---------------------------------------------------------------- worker life

    def startup(self) -> None:
        """Each consumer worker (thread, process, greenlet): once per process, connect."""
        with self._lock:
            if self._configured_pid == os.getpid():
                return
            self._configured_pid = os.getpid()
        self.clients.configure(self.requeue, [self.queue])

    def shutdown(self) -> None:
        self.clients.close(5.0)

    def requeue(self, job: Job) -> None:
        """A dashboard retry: the task again through ``huey.enqueue``; raises if refused."""
        args, kwargs, _queue = job_args(job)
        task_class = self.huey._registry.string_to_task(job.name)  # KeyError: unknown task
        self.huey.enqueue(task_class(args=tuple(args), kwargs=kwargs))

    # ---------------------------------------------------------------- signals

    def _name(self, task: Any) -> str:
        cls = type(task)
        try:
            return self._names[cls]  # two lookups a task: the registry formats a string
        except KeyError:
            name = self._names[cls] = str(self.huey._registry.task_to_string(cls))
            return name

    def _job(self, task: Any) -> Job:
        # Huey keeps the retries *left*; the runs so far follow from the task's default.
        runs = max(1, int(getattr(type(task), "default_retries", 0) or 0) - task.retries + 1)
        return make_job(task.id, self._name(task), task.args, task.kwargs, self.queue, runs)

    def enqueued(self, signal: str, task: Any) -> None:
        if task.__dict__.pop(_RETRY_FLAG, False) or in_dashboard_retry():
            return  # a retry re-enqueued (counted as retried), or a dashboard retry (collector)
        eta = task.eta
        if eta is not None and eta <= self.huey._get_timestamp():
            return  # a scheduled task moved to the queue when due: pushed when scheduled
        self.clients.get().on_pushed(self.queue)

    def executing(self, signal: str, task: Any) -> None:
        # The client times the run from here to the finish hook of the same id; the
        # args/kwargs payload is built only if the task fails.
        self.clients.get().on_started(self.queue, Job(task.id, self._name(task)))

    def complete(self, signal: str, task: Any) -> None:
        done = Job(task.id, self._name(task))  # ends the active entry on_started made
        self.clients.get().on_processed(self.queue, done)

    def retrying(self, signal: str, task: Any) -> None:
        task.__dict__[_RETRY_FLAG] = True  # seen by ``enqueued`` if it is re-enqueued now
        self.clients.get().on_retried(self.queue, Job(task.id, self._name(task)))

    def failed(self, signal: str, task: Any, exc: BaseException | None = None) -> None:
        if task.retries:
            return  # SIGNAL_RETRYING follows (and ends the active entry)
        error: BaseException | str = exc if exc is not None else f"task {signal}"
        self.clients.get().on_failed(self.queue, self._job(task), error)


def install(huey: Any, socket_path: str | os.PathLike[str] | None = None) -> HueyAdapter:
    """Report ``huey``'s tasks to the collector at ``socket_path`` (default: the standard one)."""
    return HueyAdapter(huey, socket_path).connect()
