"""Pure merging of what many hosts published into one view: counters, buckets, history points.

No I/O. The hub reads each host's records from Redis (``qdash_mp.hub.view`` decodes them) and
merges them here. Every merge is exact: counters are integer sums, latency histograms are
sparse bucket maps of ``qdash_mp.histogram``'s scheme (418 buckets) summed bucket by bucket,
so the percentiles of the merge are exactly the percentiles of the union of every host's
values (within the scheme's 2.19 % bucket error, as on one host).

Inputs are what ``qdash_mp.hub.format`` decodes: ``QueueRecord`` (a host's cumulative
counters, gauges and sparse lifetime ``runtime``/``wait`` bucket maps) and history points
(``{"t", "pushed", "processed", "failed", "runtime"}``).

History points: counts merge exactly per period. A host's history keeps per-period runtime
*summaries* (``{"count", "p50", ..., "max"}``); the publisher adds the period's bucket counts
when it knows them (``"buckets"``). When only one host has runtimes in a period its summary
passes through unchanged; when several have and every one of their points carries buckets,
the percentiles are those of the summed buckets (exact, as above); otherwise the merged point
keeps the exact ``count`` and ``max`` and leaves the percentiles ``None`` (never a guess).

Staleness: a host whose ``last_seen`` is more than ``STALE_AFTER`` seconds old is *stale*; its
last counts are kept and still summed (the jobs it counted did happen).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from operator import add
from typing import Any, Final

from qdash_mp.histogram import NBUCKETS, PERCENTILES, representative
from qdash_mp.hub.format import QueueRecord
from qdash_mp.models import EMPTY_SUMMARY, LatencySummary, QueueStat, StatsView

__all__ = [
    "STALE_AFTER",
    "Buckets",
    "HostStats",
    "Sum",
    "add_buckets",
    "fast_summary",
    "is_stale",
    "merge_points",
    "queue_stat",
    "sum_records",
]

STALE_AFTER: Final = 10.0
"""Seconds without a publish after which a host is shown as stale."""

_POINT_COUNTERS: Final = ("pushed", "processed", "failed")


def is_stale(last_seen: float, now: float, after: float = STALE_AFTER) -> bool:
    """Whether a host last seen at ``last_seen`` is stale at ``now``."""
    return now - last_seen > after


def add_buckets(target: dict[int, int], buckets: Mapping[int, int]) -> None:
    """Add the sparse ``buckets`` into ``target`` (exact: int sums)."""
    get = target.get
    for i, n in buckets.items():
        target[i] = get(i, 0) + n


Buckets = Mapping[int, int] | list[int]
"""A histogram as the hub holds it: sparse (as published) or dense (``NBUCKETS`` ints, a sum)."""


def _add_dense(dense: list[int], h: Buckets) -> None:
    """``dense += h`` with the loops in C (``map``): a hub view sums ~100k bucket counts."""
    if isinstance(h, list):
        dense[:] = map(add, dense, h)
    elif h:
        keys = h.keys()
        get, put = dense.__getitem__, dense.__setitem__
        deque(map(put, keys, map(add, map(get, keys), h.values())), maxlen=0)


@dataclass(frozen=True, slots=True)
class Sum:
    """Queue records added up: counters, throughput, and dense ``runtime``/``wait``."""

    pushed: int
    processed: int
    failed: int
    retried: int
    active: int
    throughput: float
    runtime: Buckets
    wait: Buckets


def sum_records(
    records: Iterable[QueueRecord | Sum], *, live: Iterable[bool] = ()
) -> QueueRecord | Sum:
    """The exact sum of queue records: counters added, bucket counts added. ``throughput``
    is summed over the records whose entry in ``live`` is true (all when ``live`` is empty):
    a stale host's last rate is not a rate any more. One record is returned as it is."""
    recs = list(records)
    flags = list(live) or [True] * len(recs)
    if len(recs) == 1 and flags[0]:
        return recs[0]
    pushed = processed = failed = retried = active = 0
    throughput = 0.0
    runtime = [0] * NBUCKETS
    wait = [0] * NBUCKETS
    for rec, fresh in zip(recs, flags, strict=True):
        pushed += rec.pushed
        processed += rec.processed
        failed += rec.failed
        retried += rec.retried
        active += rec.active
        if fresh:
            throughput += rec.throughput
        _add_dense(runtime, rec.runtime)
        _add_dense(wait, rec.wait)
    return Sum(pushed, processed, failed, retried, active, throughput, runtime, wait)


_REPS: Final = tuple(representative(i) for i in range(NBUCKETS))
assert tuple(p for p, _ in PERCENTILES) == (50, 90, 95, 99)  # the fields below


def fast_summary(buckets: Buckets) -> LatencySummary:
    """``histogram.summary`` of a histogram, the same values, in C-level steps (a running
    sum, a bisect per percentile): the hub summarizes thousands per view."""
    if isinstance(buckets, list):
        return _dense_summary(buckets)
    if not buckets:
        return EMPTY_SUMMARY
    keys = list(buckets)
    vals = list(buckets.values())
    if min(vals) <= 0 or keys != sorted(keys):
        items = sorted((i, n) for i, n in buckets.items() if n > 0)  # the general case
        if not items:
            return EMPTY_SUMMARY
        keys = [i for i, _ in items]
        vals = [n for _, n in items]
    cum = list(accumulate(vals))
    total = cum[-1]
    reps = _REPS
    return LatencySummary(
        total,
        reps[keys[bisect_left(cum, max(1, -(-50 * total // 100)))]],
        reps[keys[bisect_left(cum, max(1, -(-90 * total // 100)))]],
        reps[keys[bisect_left(cum, max(1, -(-95 * total // 100)))]],
        reps[keys[bisect_left(cum, max(1, -(-99 * total // 100)))]],
        reps[keys[-1]],
    )


def _dense_summary(dense: list[int]) -> LatencySummary:
    cum = list(accumulate(dense))
    total = cum[-1]
    if total <= 0:
        return EMPTY_SUMMARY
    reps = _REPS
    return LatencySummary(
        total,
        reps[bisect_left(cum, max(1, -(-50 * total // 100)))],
        reps[bisect_left(cum, max(1, -(-90 * total // 100)))],
        reps[bisect_left(cum, max(1, -(-95 * total // 100)))],
        reps[bisect_left(cum, max(1, -(-99 * total // 100)))],
        reps[bisect_left(cum, total)],
    )


_summary = fast_summary


def queue_stat(queue: str, rec: QueueRecord | Sum, *, stale: bool = False) -> QueueStat:
    """The ``QueueStat`` of one (possibly merged) queue record.

    ``pending`` follows the model's rule (``pushed - processed - failed``, floored at 0) on
    the *summed* counters, so the totals' pending agrees with the totals' counters. A stale
    record shows throughput 0.
    """
    return QueueStat(
        queue=queue,
        pushed=rec.pushed,
        processed=rec.processed,
        failed=rec.failed,
        retried=rec.retried,
        pending=max(rec.pushed - rec.processed - rec.failed, 0),
        throughput=0.0 if stale else rec.throughput,
        active=rec.active,
        runtime=_summary(rec.runtime),
        wait=_summary(rec.wait),
    )


class HostStats:
    """One host's decoded queue records, its own ``StatsView`` and its ``"hosts"`` rows
    (``QueueStat.to_dict()`` per queue), built once per seq; the stats of queues whose record
    did not change are taken over from ``previous``."""

    __slots__ = ("records", "rows", "totals_row", "view")
    records: dict[str, QueueRecord]
    rows: dict[str, dict[str, Any]]
    totals_row: dict[str, Any]
    view: StatsView

    def __init__(
        self,
        records: Mapping[str, QueueRecord],
        previous: HostStats | None = None,
        unchanged: frozenset[str] = frozenset(),
        pause: Callable[[int], None] | None = None,
    ) -> None:
        """``pause(i)`` is called before the ``i``-th queue (the hub yields the GIL)."""
        self.records = dict(records)
        old = {q.queue: q for q in previous.view.queues} if previous is not None else {}
        old_rows = previous.rows if previous is not None else {}
        queues: list[QueueStat] = []
        self.rows = {}
        for i, q in enumerate(sorted(self.records)):
            if pause is not None:
                pause(i)
            stat = old.get(q) if q in unchanged else None
            if stat is None:
                stat = queue_stat(q, self.records[q])
                self.rows[q] = stat.to_dict()
            else:
                self.rows[q] = old_rows[q]
            queues.append(stat)
        totals = queue_stat("total", sum_records(self.records.values()))
        self.totals_row = totals.to_dict()
        self.view = StatsView(queues, totals)


def merge_points(per_host: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the history points of several hosts (each an iterable of ``{"t", ...}``) per
    period ``t``: DESIGN.md's points (``runtime`` a summary dict), oldest first.

    A point's runtime is a host's summary (``{"count", "p50", ...}``) with, optionally, the
    period's ``"buckets"`` (``hub.format``), or bucket counts itself (``{bucket: count}``).
    Per period: one host with runtimes -> its summary as it is (what its own dashboard
    shows); several, every one with buckets -> the summary of the summed buckets (exact:
    the percentiles of the union, bucketed); otherwise the exact ``count`` and ``max`` and
    ``None`` percentiles."""
    sums: dict[int, dict[str, Any]] = {}
    for points in per_host:
        for p in points:
            t = int(p["t"])
            acc = sums.get(t)
            if acc is None:
                acc = sums[t] = {"t": t, **dict.fromkeys(_POINT_COUNTERS, 0), "_b": {}, "_s": []}
            for name in _POINT_COUNTERS:
                acc[name] += int(p.get(name) or 0)
            rt = p.get("runtime") or {}
            if "count" in rt:  # a summary (a host's history file), maybe with its buckets
                if rt.get("count"):
                    acc["_s"].append((rt, p.get("buckets")))
            else:  # bucket counts, {bucket: count}
                add_buckets(acc["_b"], {int(i): int(n) for i, n in rt.items()})
    out = []
    for t in sorted(sums):
        acc = sums[t]
        buckets: dict[int, int] = acc.pop("_b")
        summaries: list[tuple[Mapping[str, Any], Mapping[int, int] | None]] = acc.pop("_s")
        acc["runtime"] = _point_runtime(buckets, summaries)
        out.append(acc)
    return out


def _point_runtime(
    buckets: dict[int, int], summaries: list[tuple[Mapping[str, Any], Mapping[int, int] | None]]
) -> dict[str, Any]:
    if not summaries:
        return _summary(buckets).to_dict()
    if len(summaries) == 1 and not buckets:
        return dict(summaries[0][0])
    if all(hb for _, hb in summaries):
        for _, hb in summaries:
            add_buckets(buckets, hb or {})
        return _summary(dict(sorted(buckets.items()))).to_dict()
    # A summary without its buckets does not merge into percentiles: keep what is exact.
    count = sum(int(s["count"]) for s, _ in summaries)
    top = max(float(s["max"]) for s, _ in summaries if s.get("max") is not None)
    if buckets:
        b = _summary(buckets)
        count += b.count
        top = max(top, b.max or 0.0)
    return {"count": count, "p50": None, "p90": None, "p95": None, "p99": None, "max": top}
