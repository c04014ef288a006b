"""scale: a journal of 1M failed jobs (100k with --quick), and a dashboard with 1,000 queues.

Build. A subprocess writes the jobs straight through ``Journal.stage_failed`` and ``commit``
(batches of 10,000; no socket): ids ``job-0000000``.., queue ``scale``, name ``Task``, a
200-byte payload, a ~30-character error and a ~300-character traceback (so the records on
disk look like real ones; the index does not hold them). Its rate is reported as
``journal_build`` (records/s through the journal alone, one process, fsync per 10,000).

Recovery, two ways, each repeated (the page cache is warm after the build, as it is for a
collector restarted on the same machine):
    recovery_journal_open   ``Journal.open`` in a fresh process (after imports), in seconds;
    recovery_collector      ``qdash-mp collector`` spawned until its ``collector.json`` names
                            its pid (interpreter start, imports, journal recovery, shared
                            memory, socket and HTTP listening).

Index memory. In a fresh process, after imports: ``tracemalloc.start()``, ``Journal.open``,
``gc.collect()``, then the traced bytes still allocated, divided by the number of jobs
(``index_bytes_per_job``: Python memory the open journal keeps per job). The same open
without tracemalloc gives the RSS growth per job (``rss_bytes_per_job``: includes allocator
slack and anything recovery freed but did not return to the OS).

HTTP, against a real collector on that data dir, over one keep-alive connection, requests to
the URLs alternating (so noise hits each alike); each row's samples are single requests:
    page_first_api / page_deep_api     GET /queues/api/failed?page=1 / ?page=<last page>
    page_first_html / page_deep_html   GET /queues/failed?page=1 / ?page=<last page>
    api_stats_1000q                    GET /queues/api/stats with 1,000 queues, fed first
                                       through a ``Client`` (each checked to be there)
    overview_1000q                     GET /queues/ (HTML) with those 1,000 queues
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import (
    BenchError,
    Collector,
    Config,
    Row,
    Worker,
    percentile,
    progress,
    rss_bytes,
    say,
    short_dir,
    worker_main,
)

BENCH = "scale"
SUBJECT = "qdash_mp"
PAYLOAD_BYTES = 200
QUEUES = 1000
BUILD_BATCH = 10_000
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/worker.py", line 118, in run_job\n'
    "    result = handler(job.payload)\n"
    '  File "/srv/app/tasks/billing.py", line 42, in charge\n'
    "    invoice = client.create_invoice(customer, amount)\n"
    '  File "/srv/app/billing/client.py", line 77, in create_invoice\n'
    "    raise RuntimeError(f'payment gateway timeout after {t}s')\n"
)


def sizes(cfg: Config) -> tuple[int, int, int, int]:
    """(jobs, open repeats, collector restarts, HTTP requests per URL)."""
    return (100_000, 2, 2, 100) if cfg.quick else (1_000_000, 3, 3, 300)


def _one(module: str, role: str, params: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    w = Worker(module, role, params)
    try:
        w.read(timeout)  # ready
        w.go()
        result: dict[str, Any] = w.read(timeout)["result"]
        return result
    finally:
        w.close()


# ---------------------------------------------------------------------- orchestrator


def run(cfg: Config) -> list[Row]:
    jobs, open_repeats, restarts, requests = sizes(cfg)
    rows: list[Row] = []
    note = "" if jobs == 1_000_000 else f"{jobs:,} jobs (--quick), not 1M"
    with contextlib.ExitStack() as stack:
        data = short_dir(stack, cfg, "qdx")
        journal_dir = data / "journal"
        progress(f"scale: building a journal of {jobs:,} failed jobs")
        built = _one(__file__, "build", {"dir": str(journal_dir), "jobs": jobs})
        disk = sum(f.stat().st_size for f in journal_dir.glob("*.seg"))
        rows.append(
            Row(
                BENCH,
                SUBJECT,
                "journal_build",
                "records/s",
                [jobs / built["seconds"]],
                note=note,
                extra={"jobs": jobs, "disk_bytes_per_job": round(disk / jobs, 1)},
            )
        )
        progress(
            f"scale: built in {built['seconds']:.1f}s ({disk / jobs:.0f} bytes/job on disk); "
            f"Journal.open x{open_repeats}"
        )
        opens = [
            _one(__file__, "open", {"dir": str(journal_dir), "trace": False})
            for _ in range(open_repeats)
        ]
        traced = _one(__file__, "open", {"dir": str(journal_dir), "trace": True})
        for o in [*opens, traced]:
            if o["jobs"] != jobs:
                raise BenchError(f"Journal.open found {o['jobs']} jobs, expected {jobs}")
        rows.append(
            Row(
                BENCH,
                SUBJECT,
                "recovery_journal_open",
                "s",
                [o["seconds"] for o in opens],
                note=note,
            )
        )
        rows.append(
            Row(
                BENCH,
                SUBJECT,
                "index_bytes_per_job",
                "B/job",
                [traced["traced"] / jobs],
                note=note,
                extra={"traced_peak_bytes_per_job": round(traced["peak"] / jobs, 1)},
            )
        )
        rows.append(
            Row(
                BENCH,
                SUBJECT,
                "rss_bytes_per_job",
                "B/job",
                [o["rss"] / jobs for o in opens],
                note=note,
            )
        )
        progress(
            f"scale: open {opens[0]['seconds']:.2f}s, {traced['traced'] / jobs:.0f} B/job "
            f"traced; collector start->ready x{restarts}"
        )
        collector = Collector(data)
        stack.callback(collector.stop)
        ready: list[float] = []
        for i in range(restarts):
            ready.append(collector.start(timeout=300))
            if i < restarts - 1:
                collector.stop()
        rows.append(Row(BENCH, SUBJECT, "recovery_collector", "s", ready, note=note))
        progress(f"scale: collector ready in {min(ready):.2f}..{max(ready):.2f}s; pages over HTTP")
        last_page = -(-jobs // 50)
        urls = {
            "page_first_api": "/queues/api/failed?page=1",
            "page_deep_api": f"/queues/api/failed?page={last_page}",
            "page_first_html": "/queues/failed?page=1",
            "page_deep_html": f"/queues/failed?page={last_page}",
        }
        conn = _connect(collector.http)
        stack.callback(conn.close)
        first = _get_json(conn, urls["page_first_api"])
        deep = _get_json(conn, urls["page_deep_api"])
        if first["total"] != jobs or [j["id"] for j in first["jobs"]][:1] != [_id(jobs - 1)]:
            raise BenchError(f"first page is wrong: total {first['total']}, {first['jobs'][:1]}")
        if [j["id"] for j in deep["jobs"]][-1:] != [_id(0)]:
            raise BenchError(f"last page does not end with the oldest job: {deep['jobs'][-1:]}")
        for metric, ms in _timed(conn, urls, requests).items():
            rows.append(_latency_row(metric, ms, note))
        progress(f"scale: feeding {QUEUES} queues through a Client")
        _one(__file__, "feed", {"socket": collector.socket, "queues": QUEUES}, timeout=120)
        stats = _get_json(conn, "/queues/api/stats")
        names = {s["queue"] for s in stats["queues"]}
        missing = [q for q in _queue_names() if q not in names]
        if missing:
            raise BenchError(
                f"/queues/api/stats lacks {len(missing)} fed queues, e.g. {missing[0]}"
            )
        n_queues = len(stats["queues"])
        timed = _timed(
            conn, {"api_stats_1000q": "/queues/api/stats", "overview_1000q": "/queues/"}, requests
        )
        for metric, ms in timed.items():
            rows.append(_latency_row(metric, ms, f"{n_queues} queues"))
        collector.stop()
    return rows


def _id(i: int) -> str:
    return f"job-{i:07d}"


def _queue_names() -> list[str]:
    return [f"queue-{i:04d}" for i in range(QUEUES)]


def _latency_row(metric: str, ms: list[float], note: str) -> Row:
    s = sorted(ms)
    return Row(
        BENCH,
        SUBJECT,
        metric,
        "ms",
        ms,
        note=note,
        extra={"p99": round(percentile(s, 99), 3)},
    )


def _connect(base: str) -> http.client.HTTPConnection:
    u = urlsplit(base)
    assert u.hostname is not None
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def _get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise BenchError(f"GET {path}: HTTP {resp.status}: {body[:200]!r}")
    return body


def _get_json(conn: http.client.HTTPConnection, path: str) -> Any:
    return json.loads(_get(conn, path))


def _timed(
    conn: http.client.HTTPConnection, urls: dict[str, str], requests: int
) -> dict[str, list[float]]:
    for path in urls.values():  # warm up (templates, page cache)
        for _ in range(3):
            _get(conn, path)
    out: dict[str, list[float]] = {m: [] for m in urls}
    clock = time.perf_counter_ns
    for _ in range(requests):
        for metric, path in urls.items():
            t0 = clock()
            _get(conn, path)
            out[metric].append((clock() - t0) / 1e6)
    return out


# ---------------------------------------------------------------------- workers


def _build(p: dict[str, Any]) -> None:
    from qdash_mp.journal import Journal
    from qdash_mp.models import FailedJob, Job

    payloads = [os.urandom(PAYLOAD_BYTES // 2).hex() for _ in range(64)]
    jobs = p["jobs"]
    say(ready=True)
    from _common import wait_go

    wait_go()
    t0 = time.perf_counter()
    base = time.time() - jobs / 1000
    journal = Journal.open(Path(p["dir"]))
    try:
        for start in range(0, jobs, BUILD_BATCH):
            for i in range(start, min(jobs, start + BUILD_BATCH)):
                journal.stage_failed(
                    FailedJob(
                        id=_id(i),
                        queue="scale",
                        job=Job(id=_id(i), name="Task", payload=payloads[i % 64], attempts=1),
                        error=f"RuntimeError: gateway timeout {i}",
                        failed_at=datetime.fromtimestamp(base + i / 1000, UTC),
                        traceback=TRACEBACK,
                    )
                )
            journal.commit()
        n = len(journal)
    finally:
        journal.close()
    if n != jobs:
        raise BenchError(f"journal holds {n} jobs after the build, expected {jobs}")
    say(result={"seconds": time.perf_counter() - t0})


def _open(p: dict[str, Any]) -> None:
    import tracemalloc

    from qdash_mp.journal import Journal

    say(ready=True)
    from _common import wait_go

    wait_go()
    gc.collect()
    rss0 = rss_bytes()
    if p["trace"]:
        tracemalloc.start()
    t0 = time.perf_counter()
    journal = Journal.open(Path(p["dir"]))
    seconds = time.perf_counter() - t0
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory() if p["trace"] else (0, 0)
    rss = rss_bytes() - rss0
    n = len(journal)
    journal.close()
    say(result={"seconds": seconds, "traced": traced, "peak": peak, "rss": rss, "jobs": n})


def _feed(p: dict[str, Any]) -> None:
    from qdash_mp import Client

    client = Client(p["socket"])
    say(ready=True)
    from _common import wait_go

    wait_go()
    for q in _queue_names()[: p["queues"]]:
        for _ in range(3):
            client.on_pushed(q)
        client.on_processed(q)
    if not client.flush(timeout=60):
        raise BenchError("feed: client.flush() did not succeed")
    client.close()
    say(result={})


if __name__ == "__main__":
    worker_main({"build": _build, "open": _open, "feed": _feed})
