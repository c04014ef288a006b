"""Prometheus ``/metrics``: the counters, gauges and latency histograms in the text format.

Built with ``prometheus_client`` (a dependency: pure Python, no dependencies of its own, the
exposition format's reference implementation; writing the format by hand would mean owning
its escaping and ordering rules). Nothing is registered globally: each scrape renders one
snapshot through a private registry, off the event loop (``asyncio.to_thread``); the snapshot
itself is the inspector's (the collector's comes from shared memory, cached per change).

Families (``queue`` label on the per-queue ones)::

    qdash_jobs_pushed_total, _processed_total, _failed_total, _retried_total    counter
    qdash_jobs_pending, qdash_jobs_active                                        gauge
    qdash_job_runtime_seconds, qdash_job_wait_seconds                            histogram
    qdash_failed_jobs_stored, qdash_journal_bytes, qdash_audit_entries           gauge
    qdash_collector_up, qdash_collector_connected_clients                        gauge
    qdash_collector_batches_total                                                counter
    qdash_collector_fsync_seconds                                                summary
    qdash_collector_errors_total{kind}                                           counter

Histograms take our bucket counts (``qdash_mp.histogram``, 16 a power of two) from a
``LatencySource`` and expose them at the 27 octave edges 2**-14 .. 2**12 s plus ``+Inf``
(``cumulative_at_octaves``): every Prometheus bucket is an exact sum of ours, nothing is
resampled. ``_sum``/``_count`` are written when the source knows the exact sum.
A family whose source gives nothing (no lifecycle data yet) is left out, not zero-filled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from qdash_mp.histogram import Counts, cumulative_at_octaves
from qdash_mp.models import QueueStat, StatsView

__all__ = [
    "CONTENT_TYPE",
    "Health",
    "LatencySource",
    "Latency",
    "attribute_latency",
    "metrics_handler",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True, slots=True)
class Latency:
    """One queue's histogram: our bucket counts, and the exact sum of values if known."""

    counts: Counts
    sum: float | None = None


LatencySource = Callable[[QueueStat, str], Latency | None]
"""``source(stat, "runtime" | "wait")``: the queue's histogram, or ``None`` if there is none."""


def attribute_latency(stat: QueueStat, kind: str) -> Latency | None:
    """The default source: ``stat.<kind>_buckets`` (and ``stat.<kind>_sum``) when present."""
    counts = getattr(stat, f"{kind}_buckets", None)
    if counts is None:
        return None
    total = getattr(stat, f"{kind}_sum", None)
    return Latency(counts, float(total) if total is not None else None)


@dataclass(frozen=True, slots=True)
class Health:
    """The collector's own numbers; ``None`` fields are left out of the exposition."""

    up: bool = True
    connected_clients: int | None = None
    batches_total: int | None = None
    fsync_count: int | None = None
    fsync_seconds: float | None = None
    errors: Mapping[str, int] = field(default_factory=dict)
    failed_jobs_stored: int | None = None
    journal_bytes: int | None = None
    audit_entries: int | None = None


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _families(view: StatsView, health: Health | None, latency: LatencySource) -> Iterator[Metric]:
    queues = view.queues
    for field_name, doc in (
        ("pushed", "Jobs pushed"),
        ("processed", "Jobs processed"),
        ("failed", "Jobs failed"),
        ("retried", "Failed jobs retried from the dashboard"),
    ):
        fam = CounterMetricFamily(f"qdash_jobs_{field_name}", doc, labels=["queue"])
        for q in queues:
            fam.add_metric([q.queue], getattr(q, field_name))
        yield fam
    pending = GaugeMetricFamily(
        "qdash_jobs_pending", "pushed - processed - failed", labels=["queue"]
    )
    active = GaugeMetricFamily("qdash_jobs_active", "Jobs started, not finished", labels=["queue"])
    for q in queues:
        pending.add_metric([q.queue], q.pending)
        active.add_metric([q.queue], getattr(q, "active", 0))
    yield pending
    yield active
    for kind, doc in (("runtime", "Job runtime"), ("wait", "Time from enqueue to start")):
        hist = HistogramMetricFamily(f"qdash_job_{kind}_seconds", doc, labels=["queue"])
        for q in queues:
            data = latency(q, kind)
            if data is None:
                continue
            buckets = [(_le(le), float(n)) for le, n in cumulative_at_octaves(data.counts)]
            hist.add_metric([q.queue], buckets, data.sum)
        if hist.samples:
            yield hist
    if health is None:
        return
    yield from _gauge("qdash_collector_up", "1 while the collector serves", 1 if health.up else 0)
    yield from _gauge(
        "qdash_failed_jobs_stored", "Failed jobs in the journal", health.failed_jobs_stored
    )
    yield from _gauge("qdash_journal_bytes", "Size of the journal files", health.journal_bytes)
    yield from _gauge("qdash_audit_entries", "Entries in the audit log", health.audit_entries)
    yield from _gauge(
        "qdash_collector_connected_clients", "Client connections", health.connected_clients
    )
    if health.batches_total is not None:
        yield CounterMetricFamily(
            "qdash_collector_batches", "Batches received from clients", value=health.batches_total
        )
    if health.fsync_count is not None and health.fsync_seconds is not None:
        yield SummaryMetricFamily(
            "qdash_collector_fsync_seconds",
            "Journal commits (write + fsync)",
            count_value=health.fsync_count,
            sum_value=health.fsync_seconds,
        )
    errors = CounterMetricFamily("qdash_collector_errors", "Errors by kind", labels=["kind"])
    for kind, n in sorted(health.errors.items()):
        errors.add_metric([kind], n)
    yield errors


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _Snapshot:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(
    view: StatsView, health: Health | None = None, latency: LatencySource = attribute_latency
) -> bytes:
    """The text exposition of one snapshot (pure; no global registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(_families(view, health, latency))))
    return generate_latest(registry)


def metrics_handler(
    stats: Callable[[], Awaitable[StatsView]],
    health: Callable[[], Health | None] | None = None,
    latency: LatencySource = attribute_latency,
) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp handler for ``GET /metrics``: snapshot on the loop, render in a thread."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        view = await stats()
        now = health() if health is not None else None
        body = await asyncio.to_thread(render, view, now, latency)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return handle
