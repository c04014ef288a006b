"""Per-queue counters and rolling throughput: the ``Stats`` concept and its record layout.

One concept, two homes. ``Stats`` keeps its counters in a flat buffer of signed 64-bit
integers, one fixed-size *record* per queue; the collector keeps the very same records in a
shared-memory block (``qdash_mp.shm``) so other processes can read them. The pure functions
here (``apply_deltas``, ``read_record``, ``build_view``) are the only code that interprets a
record, whichever buffer it lives in.

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
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Protocol

from qdash_mp.models import QueueStat, StatsView

__all__ = [
    "COUNTERS",
    "DEFAULT_WINDOW",
    "Int64Buffer",
    "Stats",
    "apply_deltas",
    "build_view",
    "read_record",
    "record_len",
    "ring_slots",
]

COUNTERS: tuple[str, ...] = ("pushed", "processed", "failed", "retried")
"""Counter names in record order; the wire protocol uses the same order."""

DEFAULT_WINDOW = 60
"""Default throughput window, in seconds."""

_N = len(COUNTERS)
_PROCESSED = COUNTERS.index("processed")


class Int64Buffer(Protocol):
    """What a record lives in: ``array('q')`` in-process, ``memoryview.cast('q')`` in shm."""

    def __getitem__(self, index: int, /) -> int: ...

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

    Processed deltas also land in the throughput bucket of ``now``.
    """
    for i, d in enumerate(deltas):
        if d:
            buf[off + i] += d
            if i == _PROCESSED:
                b = now % ring
                sec = off + _N + b
                cnt = off + _N + ring + b
                if buf[sec] != now:
                    buf[sec] = now
                    buf[cnt] = 0
                buf[cnt] += d


def read_record(
    buf: Int64Buffer, off: int, ring: int, queue: str, now: int, started: int
) -> QueueStat:
    """Decode the record at ``off`` into a ``QueueStat`` as of Unix second ``now``.

    ``started`` is the second the table began counting; until ``ring - 1`` seconds have
    passed the rate is averaged over the elapsed time only.
    """
    pushed, processed, failed, retried = (buf[off + i] for i in range(_N))
    window = ring - 1
    recent = 0
    for b in range(ring):
        sec = buf[off + _N + b]
        if now - window <= sec < now:
            recent += buf[off + _N + ring + b]
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


class Stats:
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

    def on_pushed(self, queue: str) -> None:
        """A job was enqueued on ``queue``."""
        self.add(queue, pushed=1)

    def on_processed(self, queue: str, runtime: float | None = None) -> None:
        """A job of ``queue`` finished successfully.

        ``runtime`` (seconds) is accepted for API compatibility with worker code that knows
        it; runtimes are not aggregated yet.
        """
        self.add(queue, processed=1)

    def on_failed(self, queue: str) -> None:
        """A job of ``queue`` failed for good (dead-lettered)."""
        self.add(queue, failed=1)

    def on_retried(self, queue: str) -> None:
        """A failed job of ``queue`` was re-enqueued."""
        self.add(queue, retried=1)

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
