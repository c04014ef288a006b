"""Per-queue counters and rolling throughput: the ``Stats`` concept and its record layout.

One concept, two homes. ``Stats`` keeps its counters in a flat buffer of signed 64-bit
integers, one fixed-size *record* per queue; the collector keeps the very same records in a
shared-memory block (``qdash_mp.shm``, see ``docs/shm.md``) so other processes can read
them. The pure functions here (``apply_deltas``, ``read_record``, ``record_quiet``,
``build_view``) are the only code that interprets a record, whichever buffer it lives in.

Record layout (``record_len(ring)`` int64 slots, native byte order)::

    slot 0                   pushed      cumulative count
    slot 1                   processed   cumulative count
    slot 2                   failed      cumulative count
    slot 3                   retried     cumulative count
    slot 4                   started     cumulative count of jobs started
    slot 5                   active      gauge: jobs running now (set, not added; see below)
    slot 6 .. 6+R-1          ring_sec    the Unix second each ring bucket belongs to
    slot 6+R .. 6+2R-1       ring_cnt    processed jobs counted in that second
    slot H .. H+B-1          runtime     lifetime runtime histogram, B = histogram.NBUCKETS
    slot H+B .. H+2B-1       wait        lifetime wait-time histogram
    (H = head_len(R) = 6 + 2R; record_len(R) = H + 2B = 6 + 2R + 836)

``active`` is the one slot that is not a cumulative count: the embedded ``Stats`` keeps its
active counts beside the records (and this slot at 0); the collector sets it to the sum of
its connected clients' gauges (``SharedStats.set_active``) and zeroes it when it attaches
(whoever was active before a restart is not known to be now).

The *head* (slots 0 .. H-1) is what every counters-only update touches; the bucket slots come
last so a writer can copy (and redo-log) only the head when a batch carries no histogram.
``R`` (ring slots) is ``window + 1`` seconds. A processed event at second ``s`` lands in bucket
``s % R``; a bucket whose ``ring_sec`` is not ``s`` is stale and restarts at 0. Throughput is
the sum of the buckets of the last ``window`` *completed* seconds, divided by ``window`` (or by
the time since the table started, while that is shorter), so a reading does not jump with the
partial current second.

Since every bucket ``b`` only ever holds a second ``s`` with ``s % R == b``, the buckets of a
queue that processed jobs in every recent second hold exactly the pattern ``now - R + 1 ..
now``; ``read_record`` compares against that pattern first (one ``memcmp``) and only walks
the ring bucket by bucket when it differs. The result is the same either way.

Counts saturate: a slot whose sum would leave the int64 range stays at ``INT64_MAX`` (or
``INT64_MIN``), so ``apply_deltas``, ``apply_started`` and ``apply_hist`` (and every ``add``
over them) never raise on a value.

``StatsBase`` is the concept both homes implement: the hook methods over ``add`` and
``snapshot``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import operator
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress
from typing import Protocol, overload

from qdash_mp.histogram import NBUCKETS, bucket_of, summary
from qdash_mp.hooks import Hooks
from qdash_mp.models import (
    EMPTY_SUMMARY,
    PAGE_SIZE,
    Job,
    LatencySummary,
    QueueStat,
    StatsView,
    TrackedJob,
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
]

COUNTERS: tuple[str, ...] = ("pushed", "processed", "failed", "retried")
"""Counter names in record order; the wire protocol uses the same order."""

DEFAULT_WINDOW = 60
"""Default throughput window, in seconds."""

INT64_MAX = 2**63 - 1
"""Where a count stops: a slot saturates instead of overflowing (see ``apply_deltas``)."""
INT64_MIN = -(2**63)

_N = len(COUNTERS)
_PROCESSED = COUNTERS.index("processed")
STARTED_SLOT = _N
"""Slot of the ``started`` counter in a record."""
ACTIVE_SLOT = _N + 1
"""Slot of the ``active`` gauge in a record."""
_RING = _N + 2  # first ring slot


class Int64Buffer(Protocol):
    """What a record lives in: ``array('q')`` in-process, ``memoryview.cast('q')`` in shm."""

    @overload
    def __getitem__(self, index: int, /) -> int: ...

    @overload
    def __getitem__(self, index: slice, /) -> Sequence[int]: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


def ring_slots(window: float) -> int:
    """Ring buckets needed for a ``window`` in seconds (``<= 0`` means the default)."""
    return window_seconds(window) + 1


def window_seconds(window: float) -> int:
    """The window as whole seconds, at least 1; ``<= 0`` (or NaN) means the default."""
    if not window > 0:
        return DEFAULT_WINDOW
    return max(1, math.ceil(window))


def record_len(ring: int) -> int:
    """Int64 slots in one queue record with ``ring`` throughput buckets."""
    return _RING + 2 * ring + 2 * NBUCKETS


def head_len(ring: int) -> int:
    """Int64 slots of a record's head (counters, started, ring): all a counters update writes."""
    return _RING + 2 * ring


def hist_at(off: int, ring: int, which: int) -> int:
    """Slot of bucket 0 of the record at ``off``'s runtime (``which`` 0) or wait (1) histogram."""
    return off + _RING + 2 * ring + which * NBUCKETS


def check_hist(queue: str, pair: object) -> None:
    """``ValueError``/``TypeError`` unless ``pair`` is ``(runtime, wait)`` sparse histograms
    (``{bucket: n}``, bucket an int in ``0 .. NBUCKETS - 1``, n an int); ``None`` for none."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"histograms of {queue!r} must be (runtime, wait), not {pair!r}")
    for h in pair:
        if h is None:
            continue
        if not isinstance(h, Mapping):
            raise TypeError(f"a histogram of {queue!r} must be a mapping, not {h!r}")
        for b, n in h.items():
            if type(b) is not int or not 0 <= b < NBUCKETS or type(n) is not int:
                raise ValueError(
                    f"histogram of {queue!r}: bucket {b!r} (count {n!r}) is not an int in "
                    f"0..{NBUCKETS - 1} with an int count"
                )


def apply_deltas(buf: Int64Buffer, off: int, ring: int, deltas: Iterable[int], now: int) -> None:
    """Add ``deltas`` (in ``COUNTERS`` order) to the record at ``off``; ``now`` is a Unix second.

    Processed deltas also land in the throughput bucket of ``now``. Never raises on a value:
    a slot whose sum leaves the int64 range saturates at ``INT64_MAX`` (or ``INT64_MIN``), so
    one absurd batch cannot make every later batch of its queue fail. A non-int delta still
    raises ``TypeError`` (before anything of its record is written only if it comes first).
    """
    for i, d in enumerate(deltas):
        if d:
            try:
                buf[off + i] += d
            except (OverflowError, ValueError):  # array raises the one, memoryview the other
                buf[off + i] = _saturate(buf[off + i] + d)
            if i == _PROCESSED:
                b = now % ring
                sec = off + _RING + b
                cnt = off + _RING + ring + b
                if buf[sec] != now:
                    buf[sec] = now
                    buf[cnt] = 0
                try:
                    buf[cnt] += d
                except (OverflowError, ValueError):
                    buf[cnt] = _saturate(buf[cnt] + d)


def apply_started(buf: Int64Buffer, off: int, n: int) -> None:
    """Add ``n`` started jobs to the record at ``off`` (saturating, like ``apply_deltas``)."""
    at = off + STARTED_SLOT
    try:
        buf[at] += n
    except (OverflowError, ValueError):
        buf[at] = _saturate(buf[at] + n)


def apply_hist(
    buf: Int64Buffer,
    off: int,
    ring: int,
    runtime: Mapping[int, int] | None,
    wait: Mapping[int, int] | None,
) -> None:
    """Add sparse bucket deltas (``{bucket: n}``) to the record at ``off``'s histograms.

    Saturating, never raising on a value; a bucket outside ``0 .. NBUCKETS - 1`` is ignored
    (callers validate first with ``check_hist``: this only keeps a bad one from landing in
    another slot). Only the named buckets are touched.
    """
    for which, h in ((0, runtime), (1, wait)):
        if not h:
            continue
        base = hist_at(off, ring, which)
        for b, n in h.items():
            if n and 0 <= b < NBUCKETS:
                at = base + b
                try:
                    buf[at] += n
                except (OverflowError, ValueError):
                    buf[at] = _saturate(buf[at] + n)


def _summary_of(buf: Int64Buffer, at: int) -> LatencySummary:
    counts = buf[at : at + NBUCKETS]
    # Most queues report no runtimes: one C-level sum skips the 418-bucket walk.
    return summary(counts) if any(counts) else EMPTY_SUMMARY


def _saturate(value: int) -> int:
    """``value`` clamped to the int64 range (the slow path: only for sums that overflowed)."""
    return INT64_MAX if value > INT64_MAX else INT64_MIN if value < INT64_MIN else value


def read_record(
    buf: Int64Buffer, off: int, ring: int, queue: str, now: int, started: int
) -> QueueStat:
    """Decode the record at ``off`` into a ``QueueStat`` as of Unix second ``now``.

    ``started`` is the second the table began counting; until ``ring - 1`` seconds have
    passed the rate is averaged over the elapsed time only.
    """
    pushed, processed, failed, retried = buf[off : off + _N]
    ring_at = off + _RING
    recent = _recent(buf[ring_at : ring_at + ring], buf[ring_at + ring : ring_at + 2 * ring], now)
    window = ring - 1
    span = min(window, now - started)
    return QueueStat(
        queue=queue,
        pushed=pushed,
        processed=processed,
        failed=failed,
        retried=retried,
        pending=max(0, pushed - processed - failed),
        throughput=recent / span if span > 0 else 0.0,
        active=buf[off + ACTIVE_SLOT],
        runtime=_summary_of(buf, hist_at(off, ring, 0)),
        wait=_summary_of(buf, hist_at(off, ring, 1)),
    )


def record_quiet(buf: Int64Buffer, off: int, ring: int, now: int) -> bool:
    """No bucket of the record at ``off`` counts for a window ending at ``now`` or later.

    Then its throughput is 0 at ``now`` and stays 0 until the record changes: a reader may keep
    its decoded row (see ``qdash_mp.shm.rows``).
    """
    lo = now - ring + 1
    secs = buf[off + _RING : off + _RING + ring]
    if max(secs) < lo:
        return True
    cnts = buf[off + _RING + ring : off + _RING + 2 * ring]
    return all(sec < lo for sec, cnt in zip(secs, cnts, strict=True) if cnt)


def _recent(secs: Sequence[int], cnts: Sequence[int], now: int) -> int:
    """Processed jobs in the buckets of seconds ``now - window .. now - 1``.

    By definition the sum of ``cnts[b]`` over the buckets with ``now - window <= secs[b] <
    now``. ``apply_deltas`` only ever stores a second ``s`` in bucket ``s % R`` (an untouched
    bucket is ``(0, 0)``), so bucket ``b`` is in the window exactly when it holds the one
    second of the window that falls in it: the "busy" pattern ``now - R + 1 .. now``, minus the
    current bucket. Comparing with that pattern is what makes this fast; ``==`` between two
    int64 buffers of the same type is one ``memcmp``.
    """
    ring = len(secs)
    busy, waiting, zeros, busy_tuple = _patterns(ring, now)
    cur = now % ring
    if secs in (busy, waiting):
        # Every bucket but the current one holds its second of the window; the current one
        # holds ``now`` (busy) or ``now - ring`` (nothing counted yet this second).
        return sum(cnts) - cnts[cur]
    if cnts == zeros:
        return 0
    recent = sum(compress(cnts, map(operator.eq, secs, busy_tuple)))
    return recent - cnts[cur] if secs[cur] == now else recent


@functools.lru_cache(maxsize=8)
def _patterns(ring: int, now: int) -> tuple[array[int], array[int], array[int], tuple[int, ...]]:
    """``ring_sec`` of a busy queue at ``now``, the same before its first job of ``now``, zeros.

    Read-only by convention; cached because every record of a snapshot uses the same ones.
    """
    busy = array("q", bytes(8 * ring))
    for sec in range(now - ring + 1, now + 1):
        busy[sec % ring] = sec
    waiting = array("q", busy)
    waiting[now % ring] = now - ring
    return busy, waiting, array("q", bytes(8 * ring)), tuple(busy)


def merged_hists(
    buf: Int64Buffer, offsets: Iterable[int], ring: int
) -> tuple[list[int], list[int]]:
    """The sums of the runtime and of the wait histograms of the records at ``offsets``."""
    runtime, wait = [0] * NBUCKETS, [0] * NBUCKETS
    for off in offsets:
        r = hist_at(off, ring, 0)
        runtime = list(map(operator.add, runtime, buf[r : r + NBUCKETS]))
        wait = list(map(operator.add, wait, buf[r + NBUCKETS : r + 2 * NBUCKETS]))
    return runtime, wait


def build_view(
    rows: Iterable[QueueStat], merged: tuple[Sequence[int], Sequence[int]] | None = None
) -> StatsView:
    """Sort rows by queue name and add the totals row (throughputs and actives add up).

    ``merged``: the sums of every queue's runtime and wait histograms, for the totals'
    summaries (``merged_hists``); without it the totals' summaries are empty.
    """
    queues = sorted(rows, key=lambda q: q.queue)
    pushed = sum(q.pushed for q in queues)
    processed = sum(q.processed for q in queues)
    failed = sum(q.failed for q in queues)
    totals = QueueStat(
        queue="total",
        pushed=pushed,
        processed=processed,
        failed=failed,
        retried=sum(q.retried for q in queues),
        pending=max(0, pushed - processed - failed),
        throughput=sum(q.throughput for q in queues),
        active=sum(q.active for q in queues),
        runtime=summary(merged[0]) if merged is not None else EMPTY_SUMMARY,
        wait=summary(merged[1]) if merged is not None else EMPTY_SUMMARY,
    )
    return StatsView(queues=queues, totals=totals)


_NO_COUNTS = (0, 0, 0, 0)
_PROCESSED_ONE = (0, 1, 0, 0)
_FAILED_ONE = (0, 0, 1, 0)


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

    def on_retried(self, queue: str) -> None:
        """A failed job of ``queue`` was re-enqueued."""
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
