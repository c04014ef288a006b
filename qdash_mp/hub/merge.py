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
*summaries* (``{"count", "p50", ..., "max"}``), not buckets, and summaries of different hosts
do not merge into percentiles: when only one host has runtimes in a period its summary passes
through unchanged; otherwise the merged point keeps the exact ``count`` and ``max`` and
leaves the percentiles ``None`` (never a guess). Points carrying bucket maps instead
(``{bucket: count}``) merge exactly.

Staleness: a host whose ``last_seen`` is more than ``STALE_AFTER`` seconds old is *stale*; its
last counts are kept and still summed (the jobs it counted did happen).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from qdash_mp.histogram import summary
from qdash_mp.hub.format import QueueRecord
from qdash_mp.models import EMPTY_SUMMARY, LatencySummary, QueueStat, StatsView

__all__ = [
    "STALE_AFTER",
    "HostStats",
    "add_buckets",
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


def sum_records(records: Iterable[QueueRecord], *, live: Iterable[bool] = ()) -> QueueRecord:
    """The exact sum of queue records: counters added, bucket maps merged. ``throughput``
    is summed over the records whose entry in ``live`` is true (all when ``live`` is empty):
    a stale host's last rate is not a rate any more."""
    pushed = processed = failed = retried = active = 0
    throughput = 0.0
    runtime: dict[int, int] = {}
    wait: dict[int, int] = {}
    flags = iter(live)
    for rec in records:
        pushed += rec.pushed
        processed += rec.processed
        failed += rec.failed
        retried += rec.retried
        active += rec.active
        if next(flags, True):
            throughput += rec.throughput
        add_buckets(runtime, rec.runtime)
        add_buckets(wait, rec.wait)
    return QueueRecord(pushed, processed, failed, retried, active, throughput, runtime, wait)


def _summary(buckets: Mapping[int, int]) -> LatencySummary:
    return summary(buckets) if buckets else EMPTY_SUMMARY


def queue_stat(queue: str, rec: QueueRecord, *, stale: bool = False) -> QueueStat:
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
    """One host's decoded queue records and its own ``StatsView`` (built once per seq)."""

    __slots__ = ("records", "view")

    def __init__(self, records: Mapping[str, QueueRecord]) -> None:
        self.records = dict(records)
        queues = [queue_stat(q, self.records[q]) for q in sorted(self.records)]
        self.view = StatsView(queues, queue_stat("total", sum_records(self.records.values())))


def merge_points(per_host: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the history points of several hosts (each an iterable of ``{"t", ...}``) per
    period ``t``: DESIGN.md's points (``runtime`` a summary dict), oldest first."""
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
            if "count" in rt:  # already a summary (a host's history file)
                if rt.get("count"):
                    acc["_s"].append(rt)
            else:  # bucket counts, {bucket: count}
                add_buckets(acc["_b"], {int(i): int(n) for i, n in rt.items()})
    out = []
    for t in sorted(sums):
        acc = sums[t]
        buckets: dict[int, int] = acc.pop("_b")
        summaries: list[Mapping[str, Any]] = acc.pop("_s")
        acc["runtime"] = _point_runtime(buckets, summaries)
        out.append(acc)
    return out


def _point_runtime(
    buckets: Mapping[int, int], summaries: list[Mapping[str, Any]]
) -> dict[str, Any]:
    if not summaries:
        return _summary(buckets).to_dict()
    if len(summaries) == 1 and not buckets:
        return dict(summaries[0])
    # Summaries of different hosts do not merge into percentiles: keep what is exact.
    count = sum(int(s["count"]) for s in summaries)
    top = max(float(s["max"]) for s in summaries if s.get("max") is not None)
    if buckets:
        b = _summary(buckets)
        count += b.count
        top = max(top, b.max or 0.0)
    return {"count": count, "p50": None, "p90": None, "p95": None, "p99": None, "max": top}
