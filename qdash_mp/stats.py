"""Per-queue counters, throughput, lifecycle histograms: the ``Stats`` concept.

One concept, two homes. ``Stats`` keeps its per-queue *records* in a flat in-process buffer;
the collector keeps the very same records in shared memory (``qdash_mp.shm``). The record
layout and the pure functions over it live in ``qdash_mp.stats_record`` and are re-exported
here (``apply_deltas``, ``read_record``, ``build_view``, ...).

``StatsBase`` is the concept both homes implement: the hook methods over ``add``,
``_record`` and ``snapshot``.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence

from qdash_mp.histogram import NBUCKETS, bucket_of
from qdash_mp.hooks import Hooks
from qdash_mp.models import PAGE_SIZE, Job, StatsView, TrackedJob
from qdash_mp.stats_record import (
    ACTIVE_SLOT,
    COUNTERS,
    DEFAULT_WINDOW,
    INT64_MAX,
    INT64_MIN,
    STARTED_SLOT,
    Int64Buffer,
    apply_deltas,
    apply_hist,
    apply_started,
    build_view,
    check_hist,
    head_len,
    hist_at,
    merged_hists,
    read_record,
    record_len,
    record_quiet,
    ring_slots,
    window_seconds,
)
from qdash_mp.tracking import JobTracker

__all__ = [
    "ACTIVE_SLOT",
    "COUNTERS",
    "DEFAULT_WINDOW",
    "INT64_MAX",
    "INT64_MIN",
    "STARTED_SLOT",
    "Int64Buffer",
    "Stats",
    "StatsBase",
    "apply_deltas",
    "apply_hist",
    "apply_started",
    "build_view",
    "check_hist",
    "head_len",
    "hist_at",
    "merged_hists",
    "read_record",
    "record_quiet",
    "record_len",
    "ring_slots",
    "window_seconds",
]


_NO_COUNTS = (0, 0, 0, 0)
_PROCESSED_ONE = (0, 1, 0, 0)
_FAILED_ONE = (0, 0, 1, 0)
_RETRIED_ONE = (0, 0, 0, 1)


def _seconds(value: object) -> float | None:
    """``value`` as a float of seconds if it is a real number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _wait_bucket(job: object, now: float) -> int | None:
    """The wait-histogram bucket of ``job`` started at ``now``, if it carries ``enqueued_at``."""
    enqueued = _seconds(getattr(job, "enqueued_at", None)) if job is not None else None
    return None if enqueued is None else bucket_of(now - enqueued)


class StatsBase(Hooks, abc.ABC):
    """The counters concept: the hook methods, written once over ``add``, ``_record`` and
    ``snapshot``.

    ``Stats`` keeps the records in process memory; ``qdash_mp.shm.SharedStats`` keeps the very
    same records in shared memory. Code that only counts and reads accepts a ``StatsBase``.
    The hooks here count ``started`` and the runtime / wait histograms from what the call
    carries; ``Stats`` also measures runtimes and counts active jobs.
    """

    @property
    @abc.abstractmethod
    def window(self) -> int:
        """The throughput window, in seconds."""

    @abc.abstractmethod
    def add(
        self, queue: str, pushed: int = 0, processed: int = 0, failed: int = 0, retried: int = 0
    ) -> None:
        """Add several counts at once (what the collector does with a client's batch)."""

    @abc.abstractmethod
    def _record(
        self,
        queue: str,
        deltas: Sequence[int],
        started: int,
        runtime_bucket: int | None,
        wait_bucket: int | None,
    ) -> None:
        """Add ``deltas``, ``started`` and one value to a runtime / wait bucket, atomically."""

    @abc.abstractmethod
    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        """A job was enqueued on ``queue``."""
        self.add(queue, pushed=1)

    def on_started(self, queue: str, job: Job | None = None) -> None:
        """A worker began a job of ``queue``: counts ``started`` and the job's wait time."""
        self._record(queue, _NO_COUNTS, 1, None, _wait_bucket(job, time.time()))

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        """A job of ``queue`` finished successfully (``runtime`` seconds, if known)."""
        seconds = _seconds(runtime)
        if seconds is None:
            self.add(queue, processed=1)
        else:
            self._record(queue, _PROCESSED_ONE, 0, bucket_of(seconds), None)

    def on_failed(
        self,
        queue: str,
        job: Job | None = None,
        error: BaseException | str | None = None,
        runtime: float | None = None,
    ) -> None:
        """A job of ``queue`` failed for good (dead-lettered)."""
        seconds = _seconds(runtime)
        if seconds is None:
            self.add(queue, failed=1)
        else:
            self._record(queue, _FAILED_ONE, 0, bucket_of(seconds), None)

    def on_retried(self, queue: str, job: Job | None = None) -> None:
        """A job of ``queue`` will run again (counted ``retried``)."""
        self.add(queue, retried=1)


class Stats(StatsBase):
    """Concurrency-safe per-queue counters, throughput, runtime / wait histograms, active jobs.

    Every hook takes one short lock, so totals are exact under any number of threads. Queue
    labels are arbitrary strings. ``clock`` returns Unix time in seconds, ``monotonic`` the
    clock runtimes are measured with; tests inject them.

    Lifecycle: ``on_started(queue, job)`` counts the job active; its ``on_processed`` /
    ``on_failed`` (same ``job.id``) ends it and, without ``runtime=``, records the measured
    runtime. A job started twice under one id before finishing counts once (the second start
    replaces the first). Jobs started without an id are ended by a finish on their queue
    that carries no started id. Wait time = start - ``job.enqueued_at`` when that is a
    number.

    ``track_jobs`` (False, True, or queue names): keep pending and recent jobs of those
    queues (see ``qdash_mp.tracking`` for the bounds), read with ``pending`` / ``recent``.
    """

    def __init__(
        self,
        window: float = DEFAULT_WINDOW,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        track_jobs: bool | Iterable[str] = False,
    ) -> None:
        self._ring = ring_slots(window)
        self._rs = record_len(self._ring)
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}
        self._buf: array[int] = array("q")
        self._started = int(clock())
        self._active: dict[str, int] = {}
        # job id -> (queue, monotonic start, wall start) of jobs started with an id.
        self._running: dict[str, tuple[str, float, float]] = {}
        # queue -> jobs started without an id and not finished yet.
        self._anonymous: dict[str, int] = {}
        self._tracker = JobTracker(track_jobs) if track_jobs else None

    @property
    def window(self) -> int:
        """The throughput window, in seconds."""
        return self._ring - 1

    def _off(self, queue: str) -> int:
        """Offset of ``queue``'s record (created on first use); call with the lock held."""
        off = self._offsets.get(queue)
        if off is None:
            off = self._offsets[queue] = len(self._buf)
            self._buf.frombytes(bytes(8 * self._rs))
        return off

    def add(
        self, queue: str, pushed: int = 0, processed: int = 0, failed: int = 0, retried: int = 0
    ) -> None:
        """Add several counts at once (what the collector does with a client's batch)."""
        now = int(self._clock())
        with self._lock:
            off = self._offsets.get(queue)
            if off is None:
                off = self._off(queue)
            apply_deltas(self._buf, off, self._ring, (pushed, processed, failed, retried), now)

    def _record(
        self,
        queue: str,
        deltas: Sequence[int],
        started: int,
        runtime_bucket: int | None,
        wait_bucket: int | None,
    ) -> None:
        now = int(self._clock())
        with self._lock:
            self._record_locked(queue, deltas, started, runtime_bucket, wait_bucket, now)

    def _record_locked(
        self,
        queue: str,
        deltas: Sequence[int],
        started: int,
        runtime_bucket: int | None,
        wait_bucket: int | None,
        now: int,
    ) -> None:
        buf, ring = self._buf, self._ring
        off = self._off(queue)
        apply_deltas(buf, off, ring, deltas, now)
        if started:
            apply_started(buf, off, started)
        if runtime_bucket is not None:
            apply_hist(buf, off, ring, {runtime_bucket: 1}, None)
        if wait_bucket is not None:
            apply_hist(buf, off, ring, None, {wait_bucket: 1})

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        """A job was enqueued on ``queue`` (remembered as pending if the queue is tracked)."""
        tracker = self._tracker
        if tracker is None or job is None or not tracker.tracks(queue):
            self.add(queue, pushed=1)
            return
        now = int(self._clock())
        with self._lock:
            apply_deltas(self._buf, self._off(queue), self._ring, (1, 0, 0, 0), now)
            tracker.pushed(
                queue, str(job.id), str(job.name), _seconds(getattr(job, "enqueued_at", None))
            )

    def on_started(self, queue: str, job: Job | None = None) -> None:
        """A worker began a job of ``queue``: counts it started and active, times it."""
        wall = self._clock()
        mono = self._monotonic()
        wait_bucket = _wait_bucket(job, wall)
        job_id = None if job is None else getattr(job, "id", None)
        with self._lock:
            self._record_locked(queue, _NO_COUNTS, 1, None, wait_bucket, int(wall))
            active = self._active
            if job_id is None:
                self._anonymous[queue] = self._anonymous.get(queue, 0) + 1
            else:
                job_id = str(job_id)
                prev = self._running.get(job_id)
                if prev is not None:  # restarted under the same id: one job, not two
                    active[prev[0]] -= 1
                self._running[job_id] = (queue, mono, wall)
            active[queue] = active.get(queue, 0) + 1
            tracker = self._tracker
            if tracker is not None and job_id is not None and tracker.tracks(queue):
                tracker.started(queue, job_id)

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        """A job of ``queue`` finished successfully; ``runtime`` seconds, else measured."""
        self._finish(queue, job, runtime, _PROCESSED_ONE, "processed")

    def on_failed(
        self,
        queue: str,
        job: Job | None = None,
        error: BaseException | str | None = None,
        runtime: float | None = None,
    ) -> None:
        """A job of ``queue`` failed for good; ``runtime`` seconds, else measured."""
        self._finish(queue, job, runtime, _FAILED_ONE, "failed")

    def on_retried(self, queue: str, job: Job | None = None) -> None:
        """A job of ``queue`` will run again; ``job`` (if given) is no longer active here."""
        job_id = None if job is None else getattr(job, "id", None)
        with self._lock:
            self._record_locked(queue, _RETRIED_ONE, 0, None, None, int(self._clock()))
            entry = None if job_id is None else self._running.pop(str(job_id), None)
            if entry is not None:
                self._active[entry[0]] -= 1

    def _finish(
        self, queue: str, job: Job | None, runtime: object, deltas: Sequence[int], state: str
    ) -> None:
        seconds = None if runtime is None else _seconds(runtime)
        wall = self._clock()
        now = int(wall)
        job_id = None if job is None else getattr(job, "id", None)
        if job_id is not None:
            job_id = str(job_id)
        with self._lock:
            entry = None if job_id is None else self._running.pop(job_id, None)
            started_at = None
            if entry is not None:
                self._active[entry[0]] -= 1
                started_at = entry[2]
                if seconds is None:
                    seconds = self._monotonic() - entry[1]
            elif self._anonymous.get(queue, 0) > 0:
                self._anonymous[queue] -= 1
                self._active[queue] -= 1
            bucket = None if seconds is None else bucket_of(seconds)
            self._record_locked(queue, deltas, 0, bucket, None, now)
            tracker = self._tracker
            if tracker is not None and job_id is not None and tracker.tracks(queue):
                assert job is not None
                row = tracker.started(queue, job_id)
                tracker.finished(
                    TrackedJob(
                        job_id,
                        queue,
                        str(getattr(job, "name", "")),
                        state,
                        row.enqueued_at if row is not None else _seconds(job.enqueued_at),
                        started_at,
                        wall,
                        seconds,
                    )
                )

    def active(self, queue: str | None = None) -> int:
        """Jobs started and not finished now, on ``queue`` or on all queues."""
        with self._lock:
            if queue is None:
                return sum(self._active.values())
            return self._active.get(queue, 0)

    def buckets(self, queue: str) -> tuple[list[int], list[int]]:
        """The lifetime runtime and wait histograms of ``queue`` (dense, ``NBUCKETS`` each)."""
        with self._lock:
            off = self._offsets.get(queue)
            if off is None:
                return [0] * NBUCKETS, [0] * NBUCKETS
            r = hist_at(off, self._ring, 0)
            return self._buf[r : r + NBUCKETS].tolist(), self._buf[
                r + NBUCKETS : r + 2 * NBUCKETS
            ].tolist()

    @property
    def tracking(self) -> bool:
        """Whether any queue's jobs are tracked (``track_jobs``)."""
        return self._tracker is not None

    def pending(self, queue: str, offset: int = 0, limit: int = PAGE_SIZE) -> list[TrackedJob]:
        """Tracked jobs pushed on ``queue`` and not started yet, oldest first."""
        with self._lock:
            tracker = self._tracker
            return [] if tracker is None else tracker.pending(queue, offset, limit)

    def recent(self, queue: str, offset: int = 0, limit: int = PAGE_SIZE) -> list[TrackedJob]:
        """Tracked jobs of ``queue`` that finished, newest first."""
        with self._lock:
            tracker = self._tracker
            return [] if tracker is None else tracker.recent(queue, offset, limit)

    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""
        now = int(self._clock())
        with self._lock:
            buf, ring, active = self._buf, self._ring, self._active
            rows = []
            for q, off in self._offsets.items():
                row = read_record(buf, off, ring, q, now, self._started)
                n = active.get(q, 0)
                rows.append(dataclasses.replace(row, active=n) if n else row)
            merged = merged_hists(buf, self._offsets.values(), ring)
        return build_view(rows, merged)
