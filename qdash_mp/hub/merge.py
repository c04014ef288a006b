"""Pure merging of what many hosts published into one view: counters, buckets, history points.

No I/O. The hub reads each host's records from Redis (``qdash_mp.hub.view`` decodes them) and
merges them here. Every merge is exact: counters are integer sums, latency histograms are
sparse bucket maps of ``qdash_mp.histogram``'s scheme (418 buckets) summed bucket by bucket,
so the percentiles of the merge are exactly the percentiles of the union of every host's
values (within the scheme's 2.19 % bucket error, as on one host).

Queue record (one per host and queue, see ``HUB_SPEC``/``qdash_mp.hub.format``)::

    {"pushed", "processed", "failed", "retried", "started", "active": int,
     "runtime": {bucket: count}, "wait": {bucket: count}}     # cumulative, sparse

History point (one per host, queue and minute/hour)::

    {"pushed", "processed", "failed": int, "runtime": {bucket: count}}

A point whose ``runtime`` is already a summary (``{"count", "p50", ...}``, what a host's own
history file keeps) cannot be merged exactly with another host's: when only one host has
runtimes in that period its summary passes through unchanged; otherwise the merged point
keeps the exact ``count`` and ``max`` and leaves the percentiles ``None`` (never a guess).

Staleness: a host whose ``last_seen`` is more than ``STALE_AFTER`` seconds old is *stale*; its
last counts are kept and still summed (the jobs it counted did happen).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from qdash_mp.histogram import summary
from qdash_mp.models import EMPTY_SUMMARY, LatencySummary, QueueStat, StatsView

__all__ = [
    "COUNTERS",
    "STALE_AFTER",
    "HostStats",
    "add_buckets",
    "is_stale",
    "merge_points",
    "queue_stat",
    "sum_records",
    "totals_of",
]

STALE_AFTER: Final = 10.0
"""Seconds without a publish after which a host is shown as stale."""

COUNTERS: Final = ("pushed", "processed", "failed", "retried", "started", "active")
"""The integer fields of a queue record, summed across hosts."""

_POINT_COUNTERS: Final = ("pushed", "processed", "failed")


def is_stale(last_seen: float, now: float, after: float = STALE_AFTER) -> bool:
    """Whether a host last seen at ``last_seen`` is stale at ``now``."""
    return now - last_seen > after


def add_buckets(target: dict[int, int], buckets: Mapping[Any, int] | None) -> None:
    """Add the sparse ``buckets`` (keys may be ints or decimal strings) into ``target``."""
    if not buckets:
        return
    for k, n in buckets.items():
        if n:
            i = k if type(k) is int else int(k)
            target[i] = target.get(i, 0) + int(n)


def sum_records(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The exact sum of queue records: counters added, bucket maps merged."""
    out: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    runtime: dict[int, int] = {}
    wait: dict[int, int] = {}
    for rec in records:
        for name in COUNTERS:
            out[name] += int(rec.get(name) or 0)
        add_buckets(runtime, rec.get("runtime"))
        add_buckets(wait, rec.get("wait"))
    out["runtime"] = runtime
    out["wait"] = wait
    return out


def _summary(buckets: Mapping[int, int]) -> LatencySummary:
    return summary(buckets) if buckets else EMPTY_SUMMARY


def queue_stat(queue: str, rec: Mapping[str, Any], throughput: float = 0.0) -> QueueStat:
    """The ``QueueStat`` of one (possibly merged) queue record.

    ``pending`` follows the model's rule (``pushed - processed - failed``, floored at 0), on
    the *summed* counters, so the totals' pending is consistent with the totals' counters.
    """
    pushed = int(rec.get("pushed") or 0)
    processed = int(rec.get("processed") or 0)
    failed = int(rec.get("failed") or 0)
    runtime: dict[int, int] = {}
    wait: dict[int, int] = {}
    add_buckets(runtime, rec.get("runtime"))
    add_buckets(wait, rec.get("wait"))
    return QueueStat(
        queue=queue,
        pushed=pushed,
        processed=processed,
        failed=failed,
        retried=int(rec.get("retried") or 0),
        pending=max(pushed - processed - failed, 0),
        throughput=throughput,
        active=int(rec.get("active") or 0),
        runtime=_summary(runtime),
        wait=_summary(wait),
    )


def totals_of(records: Mapping[str, Mapping[str, Any]], throughput: float = 0.0) -> QueueStat:
    """The ``totals`` row of some queue records (``{queue: record}``)."""
    return queue_stat("total", sum_records(records.values()), throughput)


class HostStats:
    """One host's decoded queue records and their ``StatsView`` (built once per seq)."""

    __slots__ = ("records", "throughput", "view")

    def __init__(
        self, records: Mapping[str, Mapping[str, Any]], throughput: Mapping[str, float]
    ) -> None:
        self.records = dict(records)
        self.throughput = dict(throughput)
        queues = [
            queue_stat(q, self.records[q], self.throughput.get(q, 0.0))
            for q in sorted(self.records)
        ]
        self.view = StatsView(queues, totals_of(self.records, sum(self.throughput.values())))


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
            else:
                add_buckets(acc["_b"], rt)
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
