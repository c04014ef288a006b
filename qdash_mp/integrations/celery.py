"""Celery: ``install(app)`` reports an app's tasks to qdash_mp, in producers and workers.

``install(app, socket_path=None)`` once where the app is defined (the module every producer
and worker imports). In a worker everything is reported by the worker's main process, from
the ``Request`` that Celery keeps there for every task; the pool children run no adapter
code (measured, ~2 % of a no-op task less than signal receivers in the child:
benchmarks/README.md):

==========================  =============================================  ================
qdash_mp event              where Celery tells it                          process
==========================  =============================================  ================
pushed                      ``before_task_publish`` (first publish only)   producer
started                     ``Request.on_accepted`` (a pool process took   worker (main)
                            the task)
processed (runtime)         ``Request.on_success`` (Celery's runtime)      worker (main)
failed (error, traceback)   ``Request.on_failure``: an exception (the      worker (main)
                            child's traceback text), a lost pool process,
                            a hard time limit, a terminated task
retried                     ``Request.on_failure`` with ``Retry``, or a    worker (main)
                            ``Reject(requeue=True)``
==========================  =============================================  ================

The worker's ``Request`` classes are made per task by ``celery.worker.strategy``'s
``create_request_cls``; ``celeryd_after_setup`` (the main process, before the pool forks and
the consumer builds its strategies) wraps that function so each class gets the reporting
subclass. An ``Ignore`` (``Task.replace`` raises one) counts as processed. Where that function
is missing (another Celery), the adapter falls back to the signals ``task_prerun`` /
``task_success`` / ``task_failure`` / ``task_retry`` in the pool children, and says so.
Outside a worker those receivers stay connected, so eager tasks (``task.apply()``) are reported
by the process that runs them.

A dashboard retry calls ``app.send_task`` with the recorded name, args and kwargs on the
recorded queue, through the worker's client, registered for the queues it consumes. A library
retry republishes with ``retries > 0``; it counts as retried, not as pushed again. Pool children
leave through ``os._exit``; their client (made if a task enqueues) is closed on
``worker_process_shutdown``.
"""

from __future__ import annotations

import importlib
import logging
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

log = logging.getLogger("qdash_mp.integrations.celery")

_IN_CHILD_SIGNALS = ("task_prerun", "task_success", "task_failure", "task_retry")


class CeleryAdapter:
    """What reports one Celery ``app``: its signal receivers and, in a worker, its ``Request``
    classes; ``install`` makes and connects one."""

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
            return  # a library retry (counted as retried) or a dashboard one (collector)
        queue = routing_key or self.app.conf.task_default_queue
        self.clients.get().on_pushed(str(queue))

    def after_setup(self, sender: Any = None, instance: Any = None, **_: Any) -> None:
        """In the worker's main process, before the pool forks: the requeue route of its
        queues, and the reporting ``Request`` classes (or, failing those, the signals)."""
        self.clients.configure(self.requeue, self._consumed_queues(instance))
        if self._report_from_requests():
            signals: Any = importlib.import_module("celery.signals")
            for name in _IN_CHILD_SIGNALS:
                getattr(signals, name).disconnect(getattr(self, name))

    def _report_from_requests(self) -> bool:
        """Wrap ``create_request_cls`` so every task's worker ``Request`` reports."""
        try:
            strategy: Any = importlib.import_module("celery.worker.strategy")
            make = strategy.create_request_cls
        except (ImportError, AttributeError) as exc:
            log.warning(
                "qdash_mp: this Celery has no celery.worker.strategy.create_request_cls (%s); "
                "reporting through task signals in the pool processes instead",
                exc,
            )
            return False
        if getattr(make, "_qdash_adapters", None) is None:
            original = make

            def create_request_cls(base: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
                cls = original(base, task, *args, **kwargs)
                for adapter in create_request_cls._qdash_adapters:  # type: ignore[attr-defined]
                    if kwargs.get("app", adapter.app) is adapter.app:
                        return adapter._reporting(cls)
                return cls

            create_request_cls._qdash_adapters = []  # type: ignore[attr-defined]
            strategy.create_request_cls = make = create_request_cls
        if self not in make._qdash_adapters:
            make._qdash_adapters.append(self)
        return True

    def _reporting(self, cls: Any) -> Any:
        """``cls`` (a worker ``Request`` class) with the adapter's reports added."""
        adapter = self

        class QdashRequest(cls):  # type: ignore[misc]
            __slots__ = ()

            def on_accepted(self, pid: Any, time_accepted: Any) -> None:
                super().on_accepted(pid, time_accepted)
                adapter._accepted(self)

            def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
                failed, _, runtime = failed__retval__runtime
                if failed:  # on_failure (below) reports it, with this runtime
                    self.__dict__["_qdash_runtime"] = runtime
                    return super().on_success(failed__retval__runtime, **kwargs)
                result = super().on_success(failed__retval__runtime, **kwargs)
                adapter._succeeded(self, runtime)
                return result

            def on_failure(self, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
                result = super().on_failure(exc_info, *args, **kwargs)
                adapter._ended(self, exc_info, self.__dict__.pop("_qdash_runtime", None))
                return result

        QdashRequest.__name__ = QdashRequest.__qualname__ = f"Qdash{cls.__name__}"
        return QdashRequest

    # ---------------------------------------------------------------- worker requests

    def _accepted(self, req: Any) -> None:
        retries = req.request_dict.get("retries") or 0
        job = Job(str(req.id), req.name, None, int(retries) + 1)
        self.clients.get().on_started(self._queue_of(req.task, req), job)

    def _succeeded(self, req: Any, runtime: Any) -> None:
        done = Job(str(req.id), req.name)  # ends the active entry _accepted made
        self.clients.get().on_processed(self._queue_of(req.task, req), done, _seconds(runtime))

    def _ended(self, req: Any, exc_info: Any, runtime: Any) -> None:
        exceptions: Any = importlib.import_module("celery.exceptions")
        exc: Any = getattr(exc_info, "exception", None)
        if type(exc).__name__ == "ExceptionWithTraceback":  # billiard's wrapper, as Celery does
            exc = exc.exc  # (not getattr: Retry has an ``exc`` of its own)
        queue, client = self._queue_of(req.task, req), self.clients.get()
        done, rt = Job(str(req.id), req.name), _seconds(runtime)
        if isinstance(exc, exceptions.Retry) or (
            isinstance(exc, exceptions.Reject) and exc.requeue
        ):
            client.on_retried(queue, done)
            return
        if isinstance(exc, exceptions.Ignore) and not isinstance(exc, exceptions.Reject):
            client.on_processed(queue, done, rt)
            return
        retries = req.request_dict.get("retries") or 0
        job = make_job(req.id, req.name, req.args, req.kwargs, queue, int(retries) + 1)
        client.on_failed(queue, job, _with_traceback(exc, exc_info), rt)

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


def _seconds(runtime: Any) -> float | None:
    """Celery's runtime (a number from the pool process), or None when it sent none."""
    return float(runtime) if isinstance(runtime, (int, float)) else None


def _with_traceback(exc: Any, exc_info: Any) -> BaseException | str:
    """The error to record: ``exc`` carrying the pool process's traceback text as a note
    (the exception crossed a pipe without its traceback object)."""
    text = getattr(exc_info, "traceback", None)
    if not isinstance(exc, BaseException):
        return str(exc) if text is None else f"{exc}\n{text}"
    if exc.__traceback__ is None:
        try:
            raise exc
        except BaseException as caught:  # noqa: BLE001 -- only for a traceback object
            exc = caught
    if text and text not in getattr(exc, "__notes__", ()):
        exc.add_note(str(text))
    error: BaseException = exc
    return error
