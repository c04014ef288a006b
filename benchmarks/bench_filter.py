"""filter: the filtered failed page at 1M failed jobs (100k with --quick), over real HTTP.

A journal is built directly (batches of 10,000, no socket): 20 queues, 10 job names, errors of
8 kinds each ending in a job number, failed_at spread over a day. A real ``qdash-mp
collector`` opens it; each URL is requested over one keep-alive connection (warm-up first,
then REQUESTS times, interleaved):

    unfiltered        GET /queues/api/failed
    queue             ?queue=queue-07                     (1/20 of the jobs)
    name              ?name=task-3                        (1/10)
    text_common       ?q=gateway timeout                  (1/8, substring of the error)
    text_rare         ?q=job 123457                       (a handful)
    combined          ?queue=queue-07&name=task-7&q=unavailable&after=<mid-day>
    html_combined     the same on /queues/failed (the HTML page)

Totals that the counters cannot give are counted once per filter and then kept up to date
(``qdash_mp.journal.columns``): ``*_cold`` rows time the first request of a filter in a fresh
collector.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from _common import (
    BenchError,
    Collector,
    Config,
    Row,
    percentile,
    progress,
    say,
    short_dir,
    worker_main,
)
from bench_scale import _connect, _get, _one

BENCH = "filter"
SUBJECT = "qdash_mp"
BUILD_BATCH = 10_000
ERRORS = [
    "RuntimeError: payment gateway timeout",
    "ValueError: invalid address",
    "KeyError: 'customer'",
    "ConnectionError: redis unavailable",
    "TimeoutError: smtp read timed out",
    "PermissionError: access denied",
    "ZeroDivisionError: division by zero",
    "OSError: disk full",
]


def sizes(cfg: Config) -> tuple[int, int]:
    """(jobs, requests per URL)."""
    return (100_000, 50) if cfg.quick else (1_000_000, 200)


def _urls(base_t: float) -> dict[str, str]:
    mid = int(base_t + 43_200)
    combined = urlencode({"queue": "queue-07", "name": "task-7", "q": "unavailable", "after": mid})
    return {
        "unfiltered": "/queues/api/failed",
        "queue": "/queues/api/failed?queue=queue-07",
        "name": "/queues/api/failed?name=task-3",
        "text_common": "/queues/api/failed?" + urlencode({"q": "gateway timeout"}),
        "text_rare": "/queues/api/failed?" + urlencode({"q": "job 123457"}),
        "combined": "/queues/api/failed?" + combined,
        "html_combined": "/queues/failed?" + combined,
    }


def _latency_row(metric: str, ms: list[float], note: str) -> Row:
    s = sorted(ms)
    extra = {"p99": round(percentile(s, 99), 3)}
    return Row(BENCH, SUBJECT, metric, "ms", ms, note=note, extra=extra)


def run(cfg: Config) -> list[Row]:
    jobs, requests = sizes(cfg)
    note = "" if jobs == 1_000_000 else f"{jobs:,} jobs (--quick), not 1M"
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        data = short_dir(stack, cfg, "qdf")
        progress(f"filter: building a journal of {jobs:,} failed jobs")
        built = _one(__file__, "build", {"dir": str(data / "journal"), "jobs": jobs})
        urls = _urls(built["base"])
        collector = Collector(data)
        stack.callback(collector.stop)
        collector.start(timeout=300)
        conn = _connect(collector.http)
        clock = time.perf_counter_ns
        for path in ("/queues/api/stats", "/queues/failed", "/queues/api/failed?page=2"):
            _get(conn, path)  # warm the process (templates, first page), not the filters
        for metric, path in urls.items():  # the first request of each filter: cold
            t0 = clock()
            _get(conn, path)
            rows.append(
                Row(BENCH, SUBJECT, f"{metric}_cold", "ms", [(clock() - t0) / 1e6], note=note)
            )
        conn.request("GET", urls["combined"])
        resp = conn.getresponse()
        resp.read()
        total = resp.headers.get("X-Total-Count")
        if total is None or int(total) <= 0:
            raise BenchError(f"the combined filter matched {total} jobs")
        timed: dict[str, list[float]] = {m: [] for m in urls}
        for _ in range(requests):
            for metric, path in urls.items():
                t0 = clock()
                _get(conn, path)
                timed[metric].append((clock() - t0) / 1e6)
        conn.close()
        for metric, ms in timed.items():
            rows.append(_latency_row(metric, ms, note))
        collector.stop()
    return rows


def _build(p: dict[str, Any]) -> None:
    from qdash_mp.journal import Journal
    from qdash_mp.models import FailedJob, Job

    payload = os.urandom(100).hex()
    jobs = p["jobs"]
    say(ready=True)
    from _common import wait_go

    wait_go()
    t0 = time.perf_counter()
    base = time.time() - 86_400
    journal = Journal.open(Path(p["dir"]))
    try:
        for start in range(0, jobs, BUILD_BATCH):
            for i in range(start, min(jobs, start + BUILD_BATCH)):
                jid = f"job-{i:07d}"
                journal.stage_failed(
                    FailedJob(
                        id=jid,
                        queue=f"queue-{i % 20:02d}",
                        job=Job(id=jid, name=f"task-{i % 10}", payload=payload, attempts=1),
                        error=f"{ERRORS[i % 8]} (job {i})",
                        failed_at=datetime.fromtimestamp(base + 86_400 * i / jobs, UTC),
                    )
                )
            journal.commit()
    finally:
        journal.close()
    say(result={"seconds": time.perf_counter() - t0, "base": base})


if __name__ == "__main__":
    worker_main({"build": _build})
