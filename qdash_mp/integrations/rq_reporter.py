"""The RQ reporter: the process that holds the client and reports the worker's jobs.

Imported in the reporter (forked by the worker, ``rq_pipe.Pipe``), in producers (``Queue``
counting pushes), in a horse whose job enqueues, and by ``SimpleWorker``; never by the
forking worker itself. A finished job is what its horse said (the end record carries RQ's
runtime): no Redis read. Any other ending is read from what RQ stored in Redis after the
horse exited: failed (the ``exc_string`` of its latest result: error and traceback) or put
back by an RQ ``Retry`` (retried). So a horse killed by SIGKILL or the OOM killer, which RQ
marks failed ("Work-horse terminated unexpectedly"), is seen too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RqJob
from rq.job import JobStatus
from rq.utils import as_text, str_to_date

from qdash_mp.integrations._common import ProcessClient, make_job
from qdash_mp.integrations.rq import (
    SimpleWorker,
    Worker,
    attempts,
    end_runtime,
    finished_runtime,
    retry_state,
    span,
    start_of,
)
from qdash_mp.integrations.rq_pipe import STOP_WAIT, End, Start, read_records
from qdash_mp.models import Job

__all__ = ["clients", "remote_error", "report_around", "serve"]

log = logging.getLogger("qdash_mp.integrations.rq_reporter")

clients = ProcessClient()
"""This process's client (the reporter's; a producer's; a ``SimpleWorker``'s)."""

_FAILED = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
_STATE_FIELDS = ["status", "started_at", "ended_at", "retries_left", "number_of_retries"]


def configure(worker: Worker | SimpleWorker) -> None:
    """Connect this process's client, as the requeue route of the worker's queues."""
    if worker.qdash_socket_path is not None:
        clients.socket_path = worker.qdash_socket_path
    clients.configure(worker.qdash_requeue, [q.name for q in worker.queues])


def serve(worker: Worker, read_fd: int) -> None:
    """The reporter's life: report every record of the pipe, then flush and return."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    clients.client_kw.setdefault("name", f"{argv0}:{os.getppid()}")  # the worker's pid
    configure(worker)
    # Records are read in batches a client tick apart: their counts leave together anyway.
    pause = float(clients.client_kw["flush_interval"])  # ProcessClient always sets one
    try:
        read_records(read_fd, reporting(worker), pause)
    finally:
        clients.close(STOP_WAIT)


def reporting(worker: Worker | SimpleWorker) -> Callable[[Start | End], None]:
    """What reports each record of ``worker``'s jobs to this process's client: the
    reporter's pipe reader, and ``SimpleWorker`` around each job it runs."""
    runs: dict[str, tuple[Job, tuple[int, int]]] = {}

    def handle(record: Start | End) -> None:
        if isinstance(record, Start):
            job = Job(record.job_id, record.name, None, record.attempts, record.enqueued_at)
            runs[record.job_id] = (job, record.retries_before)
            clients.get().on_started(record.queue, job)
            return
        # An end without its start: this reporter replaced one that died mid-job.
        started, before = runs.pop(record.job_id, (Job(record.job_id, ""), (0, 0)))
        if record.runtime is not None:  # the job said it finished: the common case
            clients.get().on_processed(record.queue, started, record.runtime)
            return
        rq_job = worker.job_class(
            record.job_id, connection=worker.connection, serializer=worker.serializer
        )
        report(rq_job, record.queue, before, record.measured, started)

    return handle


def report_around(worker: SimpleWorker, run: Any, job: RqJob, queue: Any) -> None:
    """``SimpleWorker``: run the job in this process, reporting around it the records a
    forking worker writes to its reporter."""
    if clients.peek() is None:  # run outside ``work`` (no ``bootstrap``)
        configure(worker)
    handle = reporting(worker)
    start = start_of(job, queue.name)
    handle(start)
    t0 = time.perf_counter()
    try:
        run(job, queue)
    finally:
        measured = time.perf_counter() - t0
        try:
            runtime = end_runtime(finished_runtime(job), measured)  # the job object it ran
            handle(End(job.id, start.queue, measured, runtime))
        except Exception:
            log.exception("qdash_mp: could not report RQ job %s", job.id)


def report(
    job: RqJob, queue: str, retries_before: tuple[int, int], measured: float, started: Job
) -> None:
    """The outcome of ``job``'s run, from RQ's record of it, to this process's client."""
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
    runtime = _runtime(raw[1], raw[2], measured)
    after = retry_state(raw[3], raw[4])
    retried = after[0] > retries_before[0] or after[1] > retries_before[1]
    if retried and status not in _FAILED:
        # RQ put it back (fewer retries left, or one more recorded); this attempt has ended
        client.on_retried(queue, started)
    elif status == JobStatus.FINISHED:
        client.on_processed(queue, started, runtime)
    elif status in _FAILED:
        try:
            job.refresh()  # type: ignore[no-untyped-call,unused-ignore]  # its args, result
            record = _job_of(job, queue)
        except (NoSuchJobError, InvalidJobOperation):  # gone meanwhile: what the start said
            record = make_job(
                started.id, started.name, [], {}, queue, started.attempts, started.enqueued_at
            )
        result = job.latest_result()
        exc_string = getattr(result, "exc_string", None) if result is not None else None
        client.on_failed(queue, record, remote_error(exc_string), runtime)
    else:
        log.warning("qdash_mp: RQ job %s ended in status %s; not counted", job.id, status)


def _job_of(job: RqJob, queue: str) -> Job:
    enqueued = job.enqueued_at.timestamp() if job.enqueued_at is not None else None
    try:
        args, kwargs = job.args, job.kwargs
    except Exception:  # noqa: BLE001 -- undeserialisable data: still report the job
        args, kwargs = [], {}
    return make_job(job.id, job.func_name or "", args, kwargs, queue, attempts(job), enqueued)


def _runtime(
    started_at: bytes | str | None, ended_at: bytes | str | None, measured: float
) -> float:
    """The run as RQ timed it in the horse (``started_at`` to ``ended_at``), else as the
    worker measured it."""
    if not started_at or not ended_at:
        return measured
    return span(str_to_date(started_at), str_to_date(ended_at))


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
