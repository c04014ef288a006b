"""RQ: a ``Worker`` that reports from the long-lived parent and a ``Queue`` that counts pushes.

``rq worker --worker-class qdash_mp.integrations.rq.Worker --queue-class
qdash_mp.integrations.rq.Queue`` (and ``Queue`` in producers). The collector is found at
``$QDASH_SOCKET`` (or the default path); a subclass may set ``qdash_socket_path``.

RQ forks a *work horse* per job, and the horse leaves through ``os._exit``: a client in the
horse would lose its counts (or cost a round trip per job to flush them). So everything is
reported by the parent, around ``execute_job``: started before the fork, and afterwards the
outcome. A finished job (processed, runtime from RQ's ``started_at`` / ``ended_at``) is said
by the horse itself in a page it shares with the parent (``_WORD``), so the common case asks
Redis nothing. Any other ending is read from the job's own record in Redis: failed (the
``exc_string`` of its latest result: error and traceback), or put back by an RQ ``Retry``
raised or returned (``retries_left`` went down: retried). The parent thereby also sees a
horse killed by the OOM killer or SIGKILL, which RQ marks failed ("Work-horse terminated
unexpectedly"). The horse inherits the client inert (no sender thread restarted per job);
a job that enqueues from inside the horse gets a client of its own, flushed before
``os._exit``. For jobs run in the worker process itself, use ``SimpleWorker`` below.

Pushed: ``Queue.enqueue_job`` (what ``enqueue`` / ``enqueue_call`` end in); RQ's own retry
re-enqueues through ``_enqueue_job`` and is counted as retried instead. A dashboard retry
calls ``FailedJobRegistry.requeue(id)`` (the same job, with its timeout, retries and meta),
or, when RQ no longer holds the job, ``Queue.enqueue_call(name, args, kwargs)``.

The traceback text comes from the horse as a string; the error reported keeps the original
exception's class name and message, with the horse's traceback attached as a note.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import struct
import time
from datetime import datetime
from typing import Any, cast

from rq import Queue as _Queue
from rq import SimpleWorker as _SimpleWorker
from rq import Worker as _Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RqJob
from rq.job import JobStatus
from rq.registry import FailedJobRegistry
from rq.utils import as_text, str_to_date

from qdash_mp.client.process import left_to_parent
from qdash_mp.integrations._common import (
    ProcessClient,
    in_dashboard_retry,
    job_args,
    make_job,
)
from qdash_mp.models import Job

__all__ = ["Queue", "SimpleWorker", "Worker", "clients", "remote_error"]

log = logging.getLogger("qdash_mp.integrations.rq")

clients = ProcessClient()
"""This process's client (producers and the worker share it)."""

_FAILED_STATES = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)

_WORD = struct.Struct("<Bd")
"""The horse's word to the parent, in a shared page: finished (1, else 0) and the runtime
RQ recorded (``ended_at - started_at`` in seconds; NaN if it lacks one).

====== ===== =============================================================
offset bytes field
====== ===== =============================================================
0      1     1 = the job finished (RQ set it FINISHED); 0 = ask Redis
1      8     runtime, float64 little-endian
====== ===== =============================================================
"""


class Queue(_Queue):
    """An RQ ``Queue`` that counts every job enqueued on it as pushed."""

    def enqueue_job(
        self, job: RqJob, pipeline: Any = None, at_front: bool = False, unique: bool = False
    ) -> RqJob:
        job = super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        if not in_dashboard_retry():  # a dashboard retry is counted by the collector
            clients.get().on_pushed(self.name)
        return job


def remote_error(exc_string: str | None) -> BaseException:
    """An exception standing for one raised in the horse, from RQ's ``exc_string``.

    Its class is named after the original (``ValueError: boom`` reads the same as from the
    other adapters) and the horse's traceback is attached as a note, so the record's
    traceback field carries it.
    """
    text = (exc_string or "").strip()
    last = text.splitlines()[-1] if text else "the job failed without an exception text"
    name, sep, message = last.partition(": ")
    if not sep or not name.replace(".", "").replace("_", "").isalnum():
        name = "WorkHorseTerminated" if last.startswith("Work-horse") else "JobFailed"
        message = last.rstrip("; ")
    cls = type(name.rsplit(".", 1)[-1], (Exception,), {"__module__": "rq.horse"})
    error = cls(message)
    try:
        raise error
    except Exception as caught:  # noqa: BLE001 -- a traceback object to carry the note
        caught.add_note(text or last)
        return caught


class _Reporting:
    """What both worker classes add: report from the parent, around ``execute_job``."""

    qdash_socket_path: str | None = None
    queues: list[_Queue]
    connection: Any

    def _qdash_setup(self) -> None:
        if self.qdash_socket_path is not None:
            clients.socket_path = self.qdash_socket_path
        clients.configure(self.qdash_requeue, [q.name for q in self.queues])

    def qdash_requeue(self, job: Job) -> None:
        """A dashboard retry: give the job back to RQ; raises if RQ does not take it."""
        args, kwargs, queue = job_args(job)
        name = queue or self.queues[0].name
        try:
            FailedJobRegistry(name, connection=self.connection).requeue(job.id)
        except (NoSuchJobError, InvalidJobOperation):
            # RQ no longer holds it (failure_ttl passed, or requeued elsewhere): a new job.
            Queue(name, connection=self.connection).enqueue_call(job.name, args, kwargs)

    def _qdash_run(self, run: Any, job: RqJob, queue: _Queue) -> None:
        client = clients.get()
        qname = queue.name
        retries_before = _retry_state(job.retries_left, job.number_of_retries)
        # No args/kwargs payload for the start (a failure builds it): the id is what ends
        # the active entry, and the same job object reports the end.
        enqueued = job.enqueued_at.timestamp() if job.enqueued_at is not None else None
        started = Job(job.id, job.func_name or "", None, _attempts(job), enqueued)
        client.on_started(qname, started)
        t0 = time.perf_counter()
        try:
            run(job, queue)
        finally:
            measured = time.perf_counter() - t0
            try:
                finished = self._qdash_finished(job)
                if finished is None:
                    _report(job, qname, retries_before, measured, started)
                else:  # the common case, without asking Redis (an HMGET and its parsing)
                    runtime = measured if math.isnan(finished) else finished
                    client.on_processed(qname, started, runtime)
            except Exception:
                log.exception("qdash_mp: could not report RQ job %s", job.id)

    def _qdash_finished(self, job: RqJob) -> float | None:
        """The runtime of ``job`` if this process knows it finished, else None (ask Redis)."""
        return _finished_runtime(job)


def _finished_runtime(job: RqJob) -> float | None:
    """In the process that ran ``job``: its runtime if RQ set it FINISHED (NaN if RQ lacks
    a time), else None: failed, stopped, or put back by a returned ``Retry``."""
    if job.get_status(refresh=False) != JobStatus.FINISHED:  # in memory: no Redis
        return None
    if job.started_at is None or job.ended_at is None:
        return math.nan
    return _span(job.started_at, job.ended_at)


def _span(started: datetime, ended: datetime) -> float:
    """RQ's runtime of a job: ``ended_at - started_at`` in seconds, never negative."""
    return max(0.0, (ended - started).total_seconds())


def _job_of(job: RqJob, queue: str) -> Job:
    enqueued = job.enqueued_at.timestamp() if job.enqueued_at is not None else None
    try:
        args, kwargs = job.args, job.kwargs
    except Exception:  # noqa: BLE001 -- undeserialisable data: still report the job
        args, kwargs = [], {}
    return make_job(job.id, job.func_name or "", args, kwargs, queue, _attempts(job), enqueued)


_STATE_FIELDS = ["status", "started_at", "ended_at", "retries_left", "number_of_retries"]


def _report(
    job: RqJob, queue: str, retries_before: tuple[int, int], measured: float, started: Job
) -> None:
    client = clients.get()
    # The few fields that tell the outcome, in one HMGET, instead of a whole ``job.refresh()``
    # (HGETALL and RQ's restore of every field it stores). A failure, the rare path, reloads
    # the job below for its args and result.
    raw = cast("list[Any]", job.connection.hmget(job.key, _STATE_FIELDS))  # sync client
    if not raw[0]:
        # Gone already: only a finished job with result_ttl=0 is deleted that fast.
        client.on_processed(queue, started, measured)
        return
    status = JobStatus(as_text(raw[0]))
    runtime = measured
    if raw[1] and raw[2]:
        runtime = _span(str_to_date(raw[1]), str_to_date(raw[2]))
    after = _retry_state(raw[3], raw[4])
    retried = after[0] > retries_before[0] or after[1] > retries_before[1]
    if retried and status not in _FAILED_STATES:
        # RQ put it back (fewer retries left, or one more recorded); this attempt has ended
        client.on_retried(queue, started)
    elif status == JobStatus.FINISHED:
        client.on_processed(queue, started, runtime)
    elif status in _FAILED_STATES:
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
            job.refresh()  # type: ignore[no-untyped-call,unused-ignore]  # else the parent's copy
        result = job.latest_result()
        exc_string = getattr(result, "exc_string", None) if result is not None else None
        record = _job_of(job, queue)
        client.on_failed(queue, record, remote_error(exc_string), runtime)
    else:
        log.warning("qdash_mp: RQ job %s ended in status %s; not counted", job.id, status)


def _attempts(job: RqJob) -> int:
    """Runs so far as RQ knows them: 1 plus the retries it recorded for a returned ``Retry``
    (an exception-based ``Retry`` only keeps ``retries_left``, not its maximum)."""
    return int(job.number_of_retries or 0) + 1


def _retry_state(retries_left: Any, number_of_retries: Any) -> tuple[int, int]:
    """What grows when RQ puts a job back: fewer retries left, or one more retry recorded
    (from the job object, or from the raw fields of its Redis hash)."""
    return (-int(retries_left or 0), int(number_of_retries or 0))


class Worker(_Reporting, _Worker):
    """``rq.Worker`` reporting to qdash_mp from the parent (the horse forks per job)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._qdash_setup()
        # Shared with every horse (an anonymous mmap is MAP_SHARED): the horse says here
        # whether the job finished, so the parent asks Redis only for the rare other endings
        # (and for a horse that died before saying anything).
        self._qdash_word = mmap.mmap(-1, mmap.PAGESIZE)

    def execute_job(self, job: RqJob, queue: _Queue) -> None:
        self._qdash_run(super().execute_job, job, queue)

    def _qdash_finished(self, job: RqJob) -> float | None:
        finished, runtime = _WORD.unpack_from(self._qdash_word)
        return runtime if finished == 1 else None

    def fork_work_horse(self, job: RqJob, queue: _Queue) -> None:
        self._qdash_word[0] = 0  # before the fork: the horse alone may set it
        # The horse lives for one job and reports nothing: it inherits the client untouched
        # (no reset, no sender thread per job). Measured, resetting it in every horse cost
        # ~70-80 page faults a job, each a page copied on write (benchmarks/README.md).
        client = clients.peek()
        if client is None:
            super().fork_work_horse(job, queue)
            return
        with left_to_parent(client):
            super().fork_work_horse(job, queue)

    def perform_job(self, job: RqJob, queue: _Queue, execution: Any) -> bool:
        # In the horse: a job that enqueues jobs gets a client of its own, flushed before the
        # horse's os._exit (the inherited one is the parent's).
        clients.drop()
        try:
            ok = bool(super().perform_job(job, queue, execution))
            runtime = _finished_runtime(job) if ok else None
            if runtime is not None:
                _WORD.pack_into(self._qdash_word, 0, 1, runtime)
            return ok
        finally:
            made = clients.peek()
            if made is not None:
                made.flush(5.0)


class SimpleWorker(_Reporting, _SimpleWorker):
    """``rq.SimpleWorker`` (jobs run in the worker process itself) reporting to qdash_mp."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._qdash_setup()

    def execute_job(self, job: RqJob, queue: _Queue) -> None:
        self._qdash_run(super().execute_job, job, queue)
