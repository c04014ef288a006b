"""Dead-letter stores: the ``FailedJobs`` protocol and the in-process ``MemoryFailedJobs``.

A failed job is keyed by its job id: a second failure of the same job replaces the older
record (and becomes the newest). ``retry`` hands the job to ``requeue`` and drops the record
only once that returned, so a failing re-enqueue never loses the job.

Retries follow the collector's rules (docs/collector.md, "Retries"): exactly once per id (a
concurrent second retry gets ``RetryConflict``, a later one ``NotFound``); a newer failure
of the job recorded meanwhile stays; the job handed to ``requeue`` carries ``attempts + 1``;
and with ``with_stats`` a retry counts ``retried`` +1 and ``pushed`` +1 (it is enqueued
again), so ``requeue`` must not call ``on_pushed`` for it.
"""

from __future__ import annotations

import builtins
import dataclasses
import threading
import traceback as tb
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qdash_mp.errors import NotFound, RetryConflict
from qdash_mp.models import FailedJob, Job

if TYPE_CHECKING:
    from qdash_mp.stats import Stats

__all__ = ["FailedJobs", "MemoryFailedJobs", "Requeue", "describe_error"]

Requeue = Callable[[Job], object]
"""Puts a job back on its queue; raising means it was not re-enqueued."""


@runtime_checkable
class FailedJobs(Protocol):
    """What the dashboard needs of a dead-letter store."""

    def list(self) -> list[FailedJob]:
        """Every stored failed job, newest first."""
        ...

    def retry(self, id: str) -> None:
        """Re-enqueue the job and drop its record; ``NotFound`` for an unknown id."""
        ...

    def forget(self, id: str) -> None:
        """Drop the record; ``NotFound`` for an unknown id."""
        ...


def describe_error(error: BaseException | str) -> tuple[str, str]:
    """``(error text, traceback text)`` for an exception or a plain message."""
    if isinstance(error, BaseException):
        text = f"{type(error).__qualname__}: {error}" if str(error) else type(error).__qualname__
        trace = "".join(tb.format_exception(error)) if error.__traceback__ is not None else ""
        return text, trace
    return str(error), ""


class MemoryFailedJobs:
    """An in-process, thread-safe dead-letter store.

    ``requeue(job)`` is called by ``retry``; if it raises, the record is kept and the error
    propagates. ``requeue=None`` makes ``retry`` forget-only.
    """

    def __init__(self, requeue: Requeue | None = None) -> None:
        self._requeue = requeue
        self._lock = threading.Lock()
        self._jobs: dict[str, FailedJob] = {}  # insertion order = oldest first
        self._retrying: set[str] = set()
        self._stats: Stats | None = None

    def with_stats(self, stats: Stats) -> MemoryFailedJobs:
        """Count every successful retry in ``stats``; returns ``self``.

        A retry counts ``retried`` +1 and, as the job is enqueued again, ``pushed`` +1 (one
        ``add``), so ``pushed == processed + failed + pending`` holds across it.
        """
        self._stats = stats
        return self

    def record(self, job: Job, queue: str, error: BaseException | str) -> FailedJob:
        """Store ``job`` as failed on ``queue`` now (UTC), replacing an older failure of it."""
        text, trace = describe_error(error)
        failed = FailedJob(
            id=job.id,
            queue=queue,
            job=job,
            error=text,
            failed_at=datetime.now(UTC),
            traceback=trace,
        )
        with self._lock:
            self._jobs.pop(job.id, None)
            self._jobs[job.id] = failed
        return failed

    def list(self) -> list[FailedJob]:
        """Every stored failed job, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def page(self, offset: int, limit: int) -> builtins.list[FailedJob]:
        """``limit`` records starting ``offset`` records from the newest."""
        with self._lock:
            if offset >= len(self._jobs):  # also keeps huge offsets away from islice
                return []
            return list(islice(reversed(self._jobs.values()), offset, offset + limit))

    def get(self, id: str) -> FailedJob:
        """The record of ``id``; ``NotFound`` if there is none."""
        with self._lock:
            try:
                return self._jobs[id]
            except KeyError:
                raise NotFound(id) from None

    def retry(self, id: str) -> None:
        """Re-enqueue the job, then drop its record.

        The lock is not held while ``requeue`` runs (it may call back into this store); a
        concurrent retry of the same id raises ``RetryConflict`` instead of re-enqueueing
        twice. If the job failed again while being re-enqueued, the newer record stays; if it
        was forgotten meanwhile, the retry still succeeds (the job was re-enqueued). The job
        handed to ``requeue`` carries ``attempts + 1``.
        """
        with self._lock:
            failed = self._jobs.get(id)
            if failed is None:
                raise NotFound(id)
            if id in self._retrying:
                raise RetryConflict(f"a retry of job {id!r} is already in progress")
            self._retrying.add(id)
        try:
            if self._requeue is not None:
                job = failed.job
                self._requeue(dataclasses.replace(job, attempts=job.attempts + 1))
            with self._lock:
                if self._jobs.get(id) is failed:
                    del self._jobs[id]
        finally:
            with self._lock:
                self._retrying.discard(id)
        if self._stats is not None:
            # Re-enqueued: a push. Forget-only (no ``requeue``) enqueues nothing.
            pushed = 1 if self._requeue is not None else 0
            self._stats.add(failed.queue, pushed=pushed, retried=1)

    def forget(self, id: str) -> None:
        """Drop the record of ``id``; ``NotFound`` if there is none."""
        with self._lock:
            try:
                del self._jobs[id]
            except KeyError:
                raise NotFound(id) from None

    def flush(self) -> int:
        """Drop every record; returns how many there were."""
        with self._lock:
            n = len(self._jobs)
            self._jobs.clear()
            return n

    def len(self) -> int:
        """How many failed jobs are stored."""
        return len(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)
