"""The per-queue *record*: its layout and the pure functions that write and read it.

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

``qdash_mp.stats`` (which re-exports everything here) holds ``StatsBase`` and ``Stats``.
"""

from __future__ import annotations

import functools
import math
import operator
from array import array
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress
from typing import Protocol, overload

from qdash_mp.histogram import NBUCKETS, summary
from qdash_mp.models import EMPTY_SUMMARY, LatencySummary, QueueStat, StatsView

__all__ = [
    "ACTIVE_SLOT",
    "COUNTERS",
    "DEFAULT_WINDOW",
    "INT64_MAX",
    "INT64_MIN",
    "STARTED_SLOT",
    "Int64Buffer",
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
