"""Embedded ``Stats`` lifecycle: runtime and wait histograms, active jobs, opt-in job tracking.

Real threads, injected clocks; the percentiles are checked against exact nearest-rank ones
of the same data.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qdash_mp import LatencySummary, QueueStat, new_inspector
from qdash_mp.histogram import MAX_RELATIVE_ERROR, NBUCKETS, bucket_of, summary
from qdash_mp.models import Job
from qdash_mp.stats import Stats
from qdash_mp.tracking import PENDING_MAX, RECENT_MAX


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def exact_percentile(values: list[float], percent: int) -> float:
    """Nearest rank: the value of rank ceil(p * n / 100) in sorted order."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(percent * len(ordered) / 100)) - 1]


def test_known_runtimes_give_exact_buckets_and_percentiles_within_the_bound() -> None:
    rng = random.Random(42)
    # A fixed distribution: log-normal around 20 ms, inside the tracked range.
    values = [min(3000.0, max(1e-4, rng.lognormvariate(math.log(0.02), 1.2))) for _ in range(5000)]
    stats = Stats()
    for k, v in enumerate(values):
        if k % 3:
            stats.on_processed("q", runtime=v)
        else:
            stats.on_failed("q", None, "boom", runtime=v)
    runtime, wait = stats.buckets("q")
    expected = [0] * NBUCKETS
    for v in values:
        expected[bucket_of(v)] += 1
    assert runtime == expected
    assert wait == [0] * NBUCKETS
    row = stats.snapshot().queue("q")
    assert row is not None
    assert row.runtime == summary(expected)
    assert row.runtime.count == 5000
    for pct, got in ((50, row.runtime.p50), (95, row.runtime.p95), (99, row.runtime.p99)):
        exact = exact_percentile(values, pct)
        assert got is not None
        assert abs(got - exact) / exact <= MAX_RELATIVE_ERROR + 1e-12, (pct, got, exact)
    assert (row.processed, row.failed) == (3333, 1667)


def test_measured_runtime_and_wait_from_the_clocks() -> None:
    wall, mono = Clock(), Clock(50.0)
    stats = Stats(clock=wall, monotonic=mono)
    job = Job("j1", "send", enqueued_at=wall.t - 2.5)
    stats.on_started("mail", job)
    assert stats.active("mail") == 1
    assert stats.snapshot().queue("mail") == QueueStat(
        "mail", active=1, wait=summary({bucket_of(2.5): 1})
    )
    mono.t += 0.125
    wall.t += 0.125
    stats.on_processed("mail", job)
    runtime, wait = stats.buckets("mail")
    assert runtime[bucket_of(0.125)] == 1
    assert sum(runtime) == 1
    assert wait[bucket_of(2.5)] == 1
    assert stats.active() == 0
    # runtime= wins over the measured one; an unknown id is not active and not measured.
    stats.on_started("mail", Job("j2", "send"))
    mono.t += 10
    stats.on_failed("mail", Job("j2", "send"), "x", runtime=0.001)
    stats.on_processed("mail", Job("never-started", "send"))
    runtime, _ = stats.buckets("mail")
    assert (runtime[bucket_of(0.001)], runtime[bucket_of(10.0)], sum(runtime)) == (1, 0, 2)
    row = stats.snapshot().queue("mail")
    assert row is not None
    assert (row.processed, row.failed, row.active) == (2, 1, 0)
    # Bad values never raise: a bool / str enqueued_at is no wait, a str runtime no runtime.
    stats.on_started("mail", Job("j3", "send", enqueued_at=True))  # type: ignore[arg-type]
    stats.on_processed("mail", Job("j3", "send"), runtime="slow")  # type: ignore[arg-type]
    assert sum(stats.buckets("mail")[1]) == 1


def test_jobs_without_ids_end_per_queue_and_never_go_negative() -> None:
    stats = Stats()
    stats.on_started("a")
    stats.on_started("a")
    stats.on_started("b")
    assert (stats.active("a"), stats.active("b"), stats.active()) == (2, 1, 3)
    stats.on_processed("a")
    stats.on_processed("a")
    stats.on_processed("a")  # one more than started: active stays 0
    stats.on_failed("b", None, "x")
    assert stats.active() == 0
    view = stats.snapshot()
    assert view.totals.active == 0
    assert view.to_dict()["totals"]["runtime"] == LatencySummary(0).to_dict()


def test_a_retried_attempt_is_no_longer_active() -> None:
    stats = Stats()
    stats.on_started("a", Job(id="r1", name="flaky"))
    stats.on_started("a", Job(id="r2", name="flaky"))
    assert stats.active("a") == 2
    stats.on_retried("a", Job(id="r1", name="flaky"))
    stats.on_retried("a")  # no job: only counted
    stats.on_retried("a", Job(id="never-started", name="x"))
    assert stats.active("a") == 1
    q = stats.snapshot().queue("a")
    assert q is not None
    assert (q.retried, q.processed, q.failed, q.runtime.count) == (3, 0, 0, 0)


def test_active_counts_are_exact_with_threads() -> None:
    stats = Stats()
    threads, per_thread = 8, 400
    started = threading.Barrier(threads + 1)
    finish = threading.Event()

    def work(t: int) -> None:
        jobs = [Job(f"{t}-{k}", "w") for k in range(per_thread)]
        for k, job in enumerate(jobs):
            stats.on_started(f"q{t % 2}", job if k % 2 else None)
        started.wait(timeout=30)
        assert finish.wait(timeout=30)
        for k, job in enumerate(jobs):
            stats.on_processed(f"q{t % 2}", job if k % 2 else None, runtime=0.01)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    started.wait(timeout=30)
    view = stats.snapshot()
    assert (view.queue("q0").active, view.queue("q1").active) == (1600, 1600)  # type: ignore[union-attr]
    assert view.totals.active == threads * per_thread
    finish.set()
    for th in pool:
        th.join(timeout=60)
    view = stats.snapshot()
    assert view.totals.active == 0
    assert view.totals.processed == threads * per_thread
    assert view.totals.runtime.count == threads * per_thread


def test_tracking_pages_are_exact_for_a_small_run() -> None:
    wall = Clock()
    stats = Stats(clock=wall, track_jobs=["mail"])
    jobs = [Job(f"m{k}", f"send-{k}", enqueued_at=wall.t) for k in range(60)]
    for job in jobs:
        stats.on_pushed("mail", job)
        stats.on_pushed("other", Job("o" + job.id, "x"))  # not tracked
    for job in jobs[:5]:
        wall.t += 1
        stats.on_started("mail", job)
    for job in jobs[:3]:
        wall.t += 1
        stats.on_processed("mail", job, runtime=0.5)
    wall.t += 1
    stats.on_failed("mail", jobs[3], "boom", runtime=0.25)
    inspector = new_inspector(stats, None)
    page1 = asyncio.run(inspector.pending("mail", 1))
    page2 = asyncio.run(inspector.pending("mail", 2))
    assert [j.id for j in page1] == [f"m{k}" for k in range(5, 55)]
    assert [j.id for j in page2] == [f"m{k}" for k in range(55, 60)]
    assert {j.state for j in page1} == {"pending"}
    assert page1[0].name == "send-5"
    assert asyncio.run(inspector.pending("other", 1)) == []
    recent = asyncio.run(inspector.recent("mail", 1))
    assert [(j.id, j.state, j.runtime) for j in recent] == [
        ("m3", "failed", 0.25),
        ("m2", "processed", 0.5),
        ("m1", "processed", 0.5),
        ("m0", "processed", 0.5),
    ]
    assert recent[-1].to_dict() == {
        "id": "m0",
        "queue": "mail",
        "name": "send-0",
        "state": "processed",
        "enqueued_at": 1_700_000_000.0,
        "started_at": 1_700_000_001.0,
        "finished_at": 1_700_000_006.0,
        "runtime": 0.5,
    }
    assert Stats().pending("mail") == []


def test_tracking_is_bounded_for_a_large_run() -> None:
    stats = Stats(track_jobs=True)
    n = PENDING_MAX + 2_500
    for k in range(n):
        stats.on_pushed("q", Job(str(k), "j"))
    pending = stats.pending("q", 0, n)
    assert len(pending) == PENDING_MAX
    assert pending[0].id == str(n - PENDING_MAX)  # the oldest were dropped
    for k in range(n - 3_000, n):
        job = Job(str(k), "j")
        stats.on_started("q", job)
        stats.on_processed("q", job)
    assert len(stats.pending("q", 0, n)) == PENDING_MAX - 3_000
    recent = stats.recent("q", 0, n)
    assert len(recent) == RECENT_MAX
    assert recent[0].id == str(n - 1)
    assert stats.active() == 0


@pytest.mark.parametrize("runtime", [None, 0.02])
def test_shared_stats_hooks_count_started_runtime_and_wait(runtime: float | None) -> None:
    from qdash_testing.shm import fresh_name, remove_segments

    from qdash_mp.shm import SharedStats

    name = fresh_name()
    try:
        with SharedStats.create_or_attach(name) as stats:
            stats.on_started("q", Job("1", "x", enqueued_at=0.0))
            stats.on_processed("q", Job("1", "x"), runtime=runtime)
            runtime_b, wait_b = stats.buckets("q")
            assert sum(runtime_b) == (runtime is not None)
            assert wait_b[bucket_of(1e9)] == 1  # waited since 1970: the overflow bucket
            row = stats.snapshot().queue("q")
            assert row is not None
            assert (row.processed, row.active, row.wait.count) == (1, 0, 1)
            stats.unlink()
    finally:
        remove_segments(name)


def test_the_stats_command_shows_active_and_runtime_percentiles(tmp_path: Path) -> None:
    """``qdash-mp stats`` in a real process, over a table set up as a running collector's."""
    from qdash_testing.shm import fresh_name, remove_segments

    from qdash_mp.settings import CollectorSettings
    from qdash_mp.shm import SharedStats

    name = fresh_name()
    state = CollectorSettings(data_dir=tmp_path).state_file
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"pid": os.getpid(), "shm": name}))
    runtimes = {bucket_of(0.0123): 98, bucket_of(2.5): 2}
    try:
        with SharedStats.create_or_attach(name) as stats:
            stats.apply_batch(
                {"mail": (100, 100, 0, 0), "idle": (1, 0, 0, 0)},
                started={"mail": 103},
                hist={"mail": (runtimes, None)},
            )
            stats.set_active({"mail": 3})
            run = [sys.executable, "-m", "qdash_mp", "stats", "--data-dir", str(tmp_path)]
            table = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True)
            as_json = subprocess.run(
                [*run, "--json"], capture_output=True, text=True, timeout=60, check=True
            )
            stats.unlink()
    finally:
        remove_segments(name)
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "queue",
        "pushed",
        "processed",
        "failed",
        "retried",
        "pending",
        "active",
        "jobs/s",
        "p50",
        "p99",
    ]
    by_queue = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_queue["mail"][6] == "3"
    assert by_queue["mail"][8:] == ["12.3ms", "2.54s"]  # bucket midpoints, within 2.19 %
    assert by_queue["idle"][6:] == ["0", "0.0", "-", "-"]
    assert by_queue["total"][6] == "3"
    doc = json.loads(as_json.stdout)
    mail = doc["queues"][1]
    assert mail["queue"] == "mail"
    assert mail["active"] == 3
    assert mail["runtime"] == summary(runtimes).to_dict()
    assert mail["wait"]["count"] == 0
    assert doc["totals"]["runtime"]["count"] == 100
