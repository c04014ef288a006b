"""Issue 9's headline: 4 processes report known runtimes; the collector's histograms are exact.

Each process reports jobs with runtimes from a fixed lognormal (``qdash_testing.lifecycle``):
the lifetime runtime bucket counts in shared memory equal ``histogram.count_values`` over the
same data exactly, and p50/p95/p99 of ``/queues/api/stats`` are within
``histogram.MAX_RELATIVE_ERROR`` of the exact percentiles; the same with the collector killed
(``kill -9``) mid-run and restarted.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from qdash_testing.collector import CollectorProc, run_module, wait_for
from qdash_testing.http import get_json
from qdash_testing.lifecycle import runtimes, waits

from qdash_mp.histogram import MAX_RELATIVE_ERROR, NBUCKETS, count_values
from qdash_mp.settings import CollectorSettings
from qdash_mp.shm import SharedStats

SEEDS = (11, 22, 33, 44)
COUNT = 3000


def _exact_percentile(values: list[float], p: int) -> float:
    s = sorted(values)
    return s[max(1, math.ceil(p * len(s) / 100)) - 1]


def _start_workers(sock: str, pause: float) -> list[subprocess.Popen[str]]:
    return [
        run_module(
            "qdash_testing.lifecycle",
            mode="runtimes",
            socket=sock,
            seed=s,
            count=COUNT,
            pause=pause,
        )
        for s in SEEDS
    ]


def _finish(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert p.stdout is not None
        out = p.stdout.readline()
        assert json.loads(out) == {"flushed": True}
        assert p.wait(60) == 0
        p.stdout.close()
        if p.stdin is not None:
            p.stdin.close()


def _processed(http: str) -> int:
    queues = get_json(http + "/queues/api/stats")["queues"]
    return int(queues[0]["processed"]) if queues else 0


def _lifetime_buckets(data_dir: Path) -> tuple[list[int], list[int]]:
    """The collector's lifetime buckets, read from its counters after a clean stop."""
    settings = CollectorSettings(data_dir=data_dir)
    stats = SharedStats.create_or_attach(settings.shm + "x", restore_from=settings.counters_file)
    try:
        return stats.buckets("q")
    finally:
        stats.unlink()
        stats.close()


@pytest.mark.parametrize("crash", [False, True], ids=["steady", "kill9-midrun"])
def test_four_processes_exact_histograms(data_dir: Path, crash: bool) -> None:
    c = CollectorProc(data_dir).start()
    try:
        procs = _start_workers(c.socket, pause=0.05 if crash else 0.0)
        if crash:
            # crash the collector once some, not all, of the jobs have arrived
            seen = wait_for(lambda: _processed(c.http), 60, "the first jobs to arrive")
            c.kill()
            assert seen < len(SEEDS) * COUNT, "the run ended before the kill: not mid-run"
            c.start()
        _finish(procs)
        values = [v for s in SEEDS for v in runtimes(s, COUNT)]
        stats = get_json(c.http + "/queues/api/stats")
        (q,) = stats["queues"]
        assert q["processed"] == len(values)
        rt = q["runtime"]
        assert rt["count"] == len(values)
        for p in (50, 95, 99):
            exact = _exact_percentile(values, p)
            assert abs(rt[f"p{p}"] - exact) <= MAX_RELATIVE_ERROR * exact * (1 + 1e-5), p
        assert q["wait"]["count"] == len(values)
        assert q["active"] == 0
        assert c.stop() == 0
        runtime, wait = _lifetime_buckets(data_dir)
        expected = [0] * NBUCKETS
        count_values(expected, values)
        assert runtime == expected  # exact, bucket by bucket
        assert sum(wait) == len(values)
        # waits are measured by the clients (now - enqueued_at, microseconds after it was
        # set): same count, and all but the few within microseconds of a bucket edge in the
        # buckets of the drawn waits
        drawn = [0] * NBUCKETS
        count_values(drawn, [w for s in SEEDS for w in waits(s, COUNT)])
        assert sum(min(a, b) for a, b in zip(wait, drawn, strict=True)) >= 0.99 * len(values)
    finally:
        c.cleanup()
