"""Per-queue counters and rolling throughput: the ``Stats`` concept and its record layout.

One concept, two homes. ``Stats`` keeps its counters in a flat buffer of signed 64-bit
integers, one fixed-size *record* per queue; the collector keeps the very same records in a
shared-memory block (``qdash_mp.shm``, see ``docs/shm.md``) so other processes can read
them. The pure functions here (``apply_deltas``, ``read_record``, ``record_quiet``,
``build_view``) are the only code that interprets a record, whichever buffer it lives in.

Record layout (``record_len(ring)`` int64 slots, native byte order)::

    slot 0              pushed      cumulative count
    slot 1              processed   cumulative count
    slot 2              failed      cumulative count
    slot 3              retried     cumulative count
    slot 4 .. 4+R-1     ring_sec    the Unix second each ring bucket belongs to
    slot 4+R .. 4+2R-1  ring_cnt    processed jobs counted in that second

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
``INT64_MIN``), so ``apply_deltas`` (and every ``add`` over it) never raises on a value.

``StatsBase`` is the concept both homes implement: the hook methods over ``add`` and
``snapshot``.
"""

from __future__ import annotations

import abc
import functools
import math
import operator
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from typing import Protocol, overload

from qdash_mp.hooks import Hooks
from qdash_mp.models import Job, QueueStat, StatsView

__all__ = [
    "COUNTERS",
    "DEFAULT_WINDOW",
    "INT64_MAX",
    "INT64_MIN",
    "Int64Buffer",
    "Stats",
    "StatsBase",
    "apply_deltas",
    "build_view",
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
    return _N + 2 * ring


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
                sec = off + _N + b
                cnt = off + _N + ring + b
                if buf[sec] != now:
                    buf[sec] = now
                    buf[cnt] = 0
                try:
                    buf[cnt] += d
                except (OverflowError, ValueError):
                    buf[cnt] = _saturate(buf[cnt] + d)


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
    ring_at = off + _N
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
    )


def record_quiet(buf: Int64Buffer, off: int, ring: int, now: int) -> bool:
    """No bucket of the record at ``off`` counts for a window ending at ``now`` or later.

    Then its throughput is 0 at ``now`` and stays 0 until the record changes: a reader may keep
    its decoded row (see ``qdash_mp.shm.rows``).
    """
    lo = now - ring + 1
    secs = buf[off + _N : off + _N + ring]
    if max(secs) < lo:
        return True
    cnts = buf[off + _N + ring : off + _N + 2 * ring]
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


def build_view(rows: Iterable[QueueStat]) -> StatsView:
    """Sort rows by queue name and add the totals row (throughputs add up)."""
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
    )
    return StatsView(queues=queues, totals=totals)


class StatsBase(Hooks, abc.ABC):
    """The counters concept: the hook methods, written once over ``add`` and ``snapshot``.

    ``Stats`` keeps the records in process memory; ``qdash_mp.shm.SharedStats`` keeps the very
    same records in shared memory. Code that only counts and reads accepts a ``StatsBase``.
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
    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        """A job was enqueued on ``queue``."""
        self.add(queue, pushed=1)

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        """A job of ``queue`` finished successfully.

        ``runtime`` (seconds) is accepted for API compatibility with worker code that knows
        it; runtimes are not aggregated yet.
        """
        self.add(queue, processed=1)

    def on_failed(
        self,
        queue: str,
        job: Job | None = None,
        error: BaseException | str | None = None,
        runtime: float | None = None,
    ) -> None:
        """A job of ``queue`` failed for good (dead-lettered)."""
        self.add(queue, failed=1)

    def on_retried(self, queue: str) -> None:
        """A failed job of ``queue`` was re-enqueued."""
        self.add(queue, retried=1)


class Stats(StatsBase):
    """Concurrency-safe per-queue counters with a rolling throughput window.

    Every hook takes one short lock, so totals are exact under any number of threads. Queue
    labels are arbitrary strings. ``clock`` returns Unix time in seconds; tests inject one.
    """

    def __init__(
        self, window: float = DEFAULT_WINDOW, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._ring = ring_slots(window)
        self._clock = clock
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}
        self._buf: array[int] = array("q")
        self._started = int(clock())

    @property
    def window(self) -> int:
        """The throughput window, in seconds."""
        return self._ring - 1

    def add(
        self, queue: str, pushed: int = 0, processed: int = 0, failed: int = 0, retried: int = 0
    ) -> None:
        """Add several counts at once (what the collector does with a client's batch)."""
        now = int(self._clock())
        with self._lock:
            off = self._offsets.get(queue)
            if off is None:
                off = self._offsets[queue] = len(self._buf)
                self._buf.extend([0] * record_len(self._ring))
            apply_deltas(self._buf, off, self._ring, (pushed, processed, failed, retried), now)

    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""
        now = int(self._clock())
        with self._lock:
            rows = [
                read_record(self._buf, off, self._ring, q, now, self._started)
                for q, off in self._offsets.items()
            ]
        return build_view(rows)
