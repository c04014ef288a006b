"""RQ: a ``Worker`` that reports through a reporter process and a ``Queue`` that counts pushes.

``rq worker --worker-class qdash_mp.integrations.rq.Worker --queue-class
qdash_mp.integrations.rq.Queue`` (and ``Queue`` in producers). The collector is found at
``$QDASH_SOCKET`` (or the default path); a subclass may set ``qdash_socket_path``.

RQ forks a *work horse* per job, which leaves through ``os._exit``. So the worker reports,
not the horse: before the fork it writes a start record, after the horse exited an end
record, to the reporter process it forked when it started (``rq_pipe``), which holds the
client (``rq_reporter``). A finished job is said by the horse itself in a page it shares
with the worker (``_WORD``), and the end record carries it: the common case asks Redis
nothing. Any other ending (failed, retried, a horse killed by SIGKILL or the OOM killer) the
reporter reads from the job's record in Redis. The worker itself holds no client and imports
only this module and ``rq_pipe``: what the worker holds is copied, page by page, in every
horse it forks (``docs/integrations.md``). A job that enqueues from inside its horse gets a
client of its own there, flushed before ``os._exit``. For jobs run in the worker process
itself, use ``SimpleWorker`` (it reports in-process).

Pushed: ``Queue.enqueue_job`` (what ``enqueue`` / ``enqueue_call`` end in); RQ's own retry
re-enqueues through ``_enqueue_job`` and is counted as retried instead. A dashboard retry
calls ``FailedJobRegistry.requeue(id)`` (the same job, with its timeout, retries and meta),
or, when RQ no longer holds the job, ``Queue.enqueue_call(name, args, kwargs)``.
"""

from __future__ import annotations

import math
import mmap
import struct
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rq import Queue as _Queue
from rq import SimpleWorker as _SimpleWorker
from rq import Worker as _Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RqJob
from rq.job import JobStatus
from rq.registry import FailedJobRegistry

from qdash_mp.integrations.rq_pipe import Pipe, Start, encode_end, encode_start

if TYPE_CHECKING:
    from qdash_mp.models import Job

__all__ = ["Queue", "SimpleWorker", "Worker"]

_REPORTER = "qdash_mp.integrations.rq_reporter"

_WORD = struct.Struct("<Bd")
"""The horse's word to the worker, in a shared page: finished (1, else 0) and the runtime
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
        from qdash_mp.integrations._common import in_dashboard_retry
        from qdash_mp.integrations.rq_reporter import clients

        if not in_dashboard_retry():  # a dashboard retry is counted by the collector
            clients.get().on_pushed(self.name)
        return job


class _Reporting:
    """What both worker classes share: the route of dashboard retries."""

    qdash_socket_path: str | None = None
    queues: list[_Queue]
    connection: Any
    job_class: Any
    serializer: Any

    def qdash_requeue(self, job: Job) -> None:
        """A dashboard retry: give the job back to RQ; raises if RQ does not take it."""
        from qdash_mp.integrations._common import job_args

        args, kwargs, queue = job_args(job)
        name = queue or self.queues[0].name
        try:
            FailedJobRegistry(name, connection=self.connection).requeue(job.id)
        except (NoSuchJobError, InvalidJobOperation):
            # RQ no longer holds it (failure_ttl passed, or requeued elsewhere): a new job.
            Queue(name, connection=self.connection).enqueue_call(job.name, args, kwargs)


def attempts(job: RqJob) -> int:
    """Runs so far as RQ knows them: 1 plus the retries it recorded for a returned ``Retry``
    (an exception-based ``Retry`` only keeps ``retries_left``, not its maximum)."""
    return int(job.number_of_retries or 0) + 1


def retry_state(retries_left: Any, number_of_retries: Any) -> tuple[int, int]:
    """What grows when RQ puts a job back: fewer retries left, or one more retry recorded
    (from the job object, or from the raw fields of its Redis hash)."""
    return (-int(retries_left or 0), int(number_of_retries or 0))


def start_of(job: RqJob, queue: str) -> Start:
    """The start record of ``job``'s run on ``queue``, read from the job object."""
    enqueued = job.enqueued_at.timestamp() if job.enqueued_at is not None else None
    before = retry_state(job.retries_left, job.number_of_retries)
    return Start(job.id, queue, job.func_name or "", attempts(job), enqueued, before)


def end_runtime(finished: float | None, measured: float) -> float | None:
    """What an end record carries: RQ's runtime of a finished job (``finished``; the time the
    worker measured if RQ kept none, NaN), or None for any other ending (ask Redis)."""
    if finished is None:
        return None
    return measured if math.isnan(finished) else finished


def finished_runtime(job: RqJob) -> float | None:
    """In the process that ran ``job``: its runtime if RQ set it FINISHED (NaN if RQ lacks
    a time), else None: failed, stopped, or put back by a returned ``Retry``."""
    if job.get_status(refresh=False) != JobStatus.FINISHED:  # in memory: no Redis
        return None
    if job.started_at is None or job.ended_at is None:
        return math.nan
    return span(job.started_at, job.ended_at)


def span(started: datetime, ended: datetime) -> float:
    """RQ's runtime of a job: ``ended_at - started_at`` in seconds, never negative."""
    return max(0.0, (ended - started).total_seconds())


class Worker(_Reporting, _Worker):
    """``rq.Worker`` reporting to qdash_mp through its reporter process.

    The reporter is forked when the worker starts working (``bootstrap``, before RQ starts
    its pubsub thread and installs its signal handlers) and stopped, flushed, when ``work``
    returns. ``execute_job`` called outside ``work`` starts one too.
    """

    _qdash_pipe: Pipe | None = None
    _qdash_word: mmap.mmap | None = None

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        self._qdash_start()
        super().bootstrap(*args, **kwargs)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            pipe, self._qdash_pipe = self._qdash_pipe, None
            if pipe is not None:
                pipe.stop()

    def _qdash_start(self) -> Pipe:
        pipe = self._qdash_pipe
        if pipe is None:
            # Shared with every horse (an anonymous mmap is MAP_SHARED): the horse says here
            # whether its job finished, so the reporter asks Redis only for other endings.
            self._qdash_word = mmap.mmap(-1, mmap.PAGESIZE)
            pipe = self._qdash_pipe = Pipe(self._qdash_serve)
            pipe.start()
        return pipe

    def _qdash_serve(self, read_fd: int) -> None:
        self._qdash_pipe = None  # the reporter is not the worker
        from qdash_mp.integrations.rq_reporter import serve

        serve(self, read_fd)

    def execute_job(self, job: RqJob, queue: _Queue) -> None:
        pipe = self._qdash_start()
        word = self._qdash_word
        assert word is not None
        start = start_of(job, queue.name)
        pipe.send(encode_start(*start))
        word[0] = 0  # before the fork: the horse alone may set it
        t0 = time.perf_counter()
        try:
            super().execute_job(job, queue)
        finally:
            measured = time.perf_counter() - t0
            said, runtime = _WORD.unpack_from(word)
            finished = runtime if said == 1 else None
            pipe.send(encode_end(job.id, start.queue, measured, end_runtime(finished, measured)))

    def perform_job(self, job: RqJob, queue: _Queue, execution: Any) -> bool:
        # In the horse. A job that enqueued jobs made a client of its own (or the fork reset
        # one the worker had: the horse's own now): flush it before the horse's os._exit.
        if self._qdash_pipe is not None:
            self._qdash_pipe.leave()
        try:
            ok = bool(super().perform_job(job, queue, execution))
            runtime = finished_runtime(job) if ok else None
            if runtime is not None and self._qdash_word is not None:
                _WORD.pack_into(self._qdash_word, 0, 1, runtime)
            return ok
        finally:
            reporter = sys.modules.get(_REPORTER)
            made = reporter.clients.peek() if reporter is not None else None
            if made is not None:
                made.flush(5.0)


class SimpleWorker(_Reporting, _SimpleWorker):
    """``rq.SimpleWorker`` (jobs run in the worker process itself) reporting in-process."""

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        from qdash_mp.integrations.rq_reporter import configure

        configure(self)  # the requeue route is there before the first job
        super().bootstrap(*args, **kwargs)

    def execute_job(self, job: RqJob, queue: _Queue) -> None:
        from qdash_mp.integrations.rq_reporter import report_around

        report_around(self, super().execute_job, job, queue)
