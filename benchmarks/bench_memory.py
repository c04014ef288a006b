"""memory: what one queue costs, in shared memory, on disk and in the collector's process.

Measured, not computed from constants, so a layout change shows here:

    shm_bytes_per_queue       a ``SharedStats`` table created for 512 queues and one for 1,024
                              (same client table); the difference of the two segments' sizes in
                              /dev/shm, divided by 512 (record: counters, started, active, the
                              throughput ring, 2 x 418 lifetime bucket counts; directory entry;
                              redo-log entry)
    history_bytes_per_queue   a ``History`` directory after minutes of one queue closed: the
                              queue's file size (fixed: 24 h of minutes, 30 days of hours)
    windows_bytes_per_queue   Python memory (tracemalloc) of the collector's rolling windows of
                              one queue, idle (no jobs) and busy (every minute of 65 a spread
                              of ~240 distinct runtime and wait buckets: the most they hold)
    stats_bytes_per_queue     Python memory of an embedded ``Stats`` per queue (1,000 queues,
                              each with runtimes and waits)

One sample each (they are deterministic up to allocator details).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import tracemalloc
import uuid
from pathlib import Path

from _common import Config, Row, progress, short_dir

from qdash_mp.histogram import NBUCKETS, count_values
from qdash_mp.history import History, QueueTotals
from qdash_mp.models import Job
from qdash_mp.shm import SharedStats, segment_name
from qdash_mp.stats import Stats

BENCH = "memory"


def _segment_bytes(capacity: int) -> int:
    stats = SharedStats.create_or_attach(f"qdbm{uuid.uuid4().hex[:12]}", capacity=capacity)
    try:
        path = Path("/dev/shm") / segment_name(stats.name, stats.generation)
        return path.stat().st_size
    finally:
        stats.unlink()  # also closes


def shm_per_queue() -> float:
    small, large = _segment_bytes(512), _segment_bytes(1024)
    return (large - small) / 512


def history_per_queue(where: Path) -> float:
    minute = 1_700_000_040.0
    counts = [0] * NBUCKETS
    with History(where, clock=lambda: minute, durable=False) as history:
        for i in range(5):
            count_values(counts, [0.01 * (i + 1)] * 10)
            totals = {"q": QueueTotals(10 * (i + 1), 10 * (i + 1), 0, tuple(counts))}
            history.tick(totals, now=minute + 60 * i)
    files = [p for p in where.iterdir() if p.suffix == ".qh"]
    assert len(files) == 1, files
    return float(files[0].stat().st_size)


def windows_per_queue(busy: bool) -> float:
    from qdash_mp.collector.windows import Windows

    rng = random.Random(7)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    windows = Windows()
    runtime, wait = [0] * NBUCKETS, [0] * NBUCKETS
    windows.prime({"q": (list(runtime), list(wait))})
    for minute in range(65):
        if busy:
            count_values(runtime, [rng.lognormvariate(-3, 2) for _ in range(2_000)])
            count_values(wait, [rng.lognormvariate(0, 2) for _ in range(2_000)])
        windows.update(28_000_000 + minute, {"q": (list(runtime), list(wait))})
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del windows
    return float(after - before)


def stats_per_queue() -> float:
    queues = 1_000
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    stats = Stats()
    for i in range(queues):
        q = f"queue-{i:04d}"
        job = Job(id=f"j{i}", name="t", enqueued_at=0.0)
        stats.on_pushed(q)
        stats.on_started(q, job)
        stats.on_processed(q, job, runtime=0.01 * (1 + i % 50))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del stats
    return (after - before) / queues


def run(cfg: Config) -> list[Row]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        where = short_dir(stack, cfg, "qdbm")
        progress("memory: shared-memory segment per queue")
        rows.append(
            Row(BENCH, "qdash_mp", "shm_bytes_per_queue", "B/queue", samples=[shm_per_queue()])
        )
        progress("memory: history file per queue")
        rows.append(
            Row(
                BENCH,
                "qdash_mp",
                "history_bytes_per_queue",
                "B/queue",
                samples=[history_per_queue(where / "history")],
            )
        )
        progress("memory: rolling windows per queue (idle, busy)")
        for busy in (False, True):
            rows.append(
                Row(
                    BENCH,
                    "qdash_mp",
                    f"windows_bytes_per_queue_{'busy' if busy else 'idle'}",
                    "B/queue",
                    samples=[windows_per_queue(busy)],
                )
            )
        progress("memory: embedded Stats per queue")
        rows.append(
            Row(BENCH, "qdash_mp", "stats_bytes_per_queue", "B/queue", samples=[stats_per_queue()])
        )
    for row in rows:
        progress(f"memory: {row.metric} = {row.value:,.0f} B")
    if os.environ.get("QDASH_BENCH_DEBUG"):
        progress(repr(rows))
    return rows
