"""hub_failed: the hub's filtered failed list (``queue=``, ``q=``) at 100,000 failed jobs.

One host's 100,000 failed jobs (20,000 with ``--quick``; 10 queues, 5 error texts) are
written into a private redis-server by the real ``publish.lua`` (2,000 a call, as a
publisher drains a backlog); a real ``qdash-mp hub`` process answers
``/queues/api/failed`` over one keep-alive connection:

    hub_failed_queue       ?queue=q3 (a tenth of the jobs)
    hub_failed_text        ?q=timeout (a fifth: the error text contains it, any case)
    hub_failed_host_queue  ?host=h0&queue=q3
    hub_failed_live        ?queue=q3 while the host publishes 20 new failures and 5
                           removals every 0.5 s (each request first catches up with them)

Samples are single requests (~20 a second); the target is on the median, p99 in the row's
extra. The first filtered request (the hub's mirror of the index read in full, the cost
every filtered page had before it) is in the ``cold_ms`` extra of the queue row, and
``scan_ms`` there is one filtered page the old way, by a scan of the index in Redis
(``HubInspector.failed_query_by_scan``, in this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from _common import (
    BenchError,
    Config,
    Row,
    percentile,
    progress,
    sleep_until_ns,
    start_hub,
    start_redis,
)

BENCH = "hub_failed"
QUEUES = 10
ERRORS = ["ValueError: bad input", "SMTP Timeout after 30 s", "KeyError: 'id'", "x", "disk full"]
T0 = 1_700_000_000.0


def sizes(cfg: Config) -> dict[str, Any]:
    if cfg.quick:
        return {"jobs": 20_000, "requests": 60}
    return {"jobs": 100_000, "requests": 300}


class _Host:
    """Publishes failed entries of host ``h0`` through the real script."""

    def __init__(self, r: Any) -> None:
        from qdash_mp.hub.publisher import SCRIPT

        self.r = r
        self.script = r.register_script(SCRIPT)
        self.seq = 0

    def publish(self, adds: list[tuple[str, int, float]], removes: list[str]) -> None:
        from qdash_mp.hub.format import HostInfo, encode_host
        from qdash_mp.hub.publisher import Publish, build_args
        from qdash_mp.models import Job
        from qdash_mp.records import FailedRecord, pack_failed

        self.seq += 1
        p = Publish(self.seq, encode_host(HostInfo(self.seq, time.time(), 1.0, "bench", 1)))
        for id, k, at in adds:
            job = Job(id, f"task{k % 7}", {"n": k}, 1)
            rec = FailedRecord.from_job(job, f"q{k % QUEUES}", ERRORS[k % 5], "Traceback", at)
            p.adds.append((id, repr(at), pack_failed(rec)))
        p.removes = removes
        reply = self.script(args=build_args("qdash:", "h0", p, time.time(), 0))
        if reply[0] != 1:
            raise BenchError("publish not applied")


def run(cfg: Config) -> list[Row]:
    import redis

    n = sizes(cfg)
    rows = []
    with contextlib.ExitStack() as stack:
        server = start_redis(stack, cfg)
        url = f"redis://127.0.0.1:{server.port}/0"
        r = redis.Redis(port=server.port)
        stack.callback(r.close)
        host = _Host(r)
        progress(f"hub_failed: publishing {n['jobs']:,} failed jobs of one host")
        for k0 in range(0, n["jobs"], 2000):
            host.publish([(f"j{k}", k, T0 + k) for k in range(k0, min(k0 + 2000, n["jobs"]))], [])
        scan_ms = _scan_ms(url)
        u = urlsplit(start_hub(stack, url))
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
        stack.callback(conn.close)
        t0 = time.perf_counter()
        total = _get(conn, "/queues/api/failed?queue=q3")
        cold = (time.perf_counter() - t0) * 1e3
        if total != n["jobs"] // QUEUES:
            raise BenchError(f"queue=q3 counted {total}, not {n['jobs'] // QUEUES}")
        cases = [
            ("hub_failed_queue", "/queues/api/failed?queue=q3", "queue=q3"),
            ("hub_failed_text", "/queues/api/failed?q=timeout", "q=timeout"),
            ("hub_failed_host_queue", "/queues/api/failed?host=h0&queue=q3", "host=h0&queue=q3"),
        ]
        for subject, path, what in cases:
            progress(f"hub_failed: {what} at {n['jobs']:,}")
            extra = {"cold_ms": round(cold, 1), "scan_ms": round(scan_ms, 1)}
            rows.append(
                _row(
                    subject,
                    _timed(conn, path, n["requests"]),
                    n,
                    what,
                    extra if subject == "hub_failed_queue" else {},
                )
            )
        progress("hub_failed: queue=q3 while the host publishes 20 failures + 5 removals / 0.5 s")
        stop = threading.Event()
        feeder = threading.Thread(target=_feed, args=(host, n["jobs"], stop), daemon=True)
        feeder.start()
        try:
            live = _timed(conn, "/queues/api/failed?queue=q3", n["requests"])
        finally:
            stop.set()
            feeder.join()
        rows.append(_row("hub_failed_live", live, n, "queue=q3, 40 failures + 10 removals/s", {}))
    return rows


def _feed(host: _Host, first: int, stop: threading.Event) -> None:
    k = first
    rnd = random.Random(3)
    while not stop.wait(0.5):
        adds = [(f"j{i}", i, T0 + i) for i in range(k, k + 20)]
        removes = [f"j{rnd.randrange(k)}" for _ in range(5)]
        host.publish(adds, removes)
        k += 20


def _scan_ms(url: str) -> float:
    """One ``queue=q3`` page the pre-mirror way: a scan of the index in Redis."""
    import redis.asyncio as aioredis

    from qdash_mp.failed_filter import FailedFilter
    from qdash_mp.hub.inspector import HubInspector

    async def once() -> float:
        client = aioredis.from_url(url)
        try:
            ins = HubInspector(client)
            hw = int(await client.get("qdash:fseq") or 0) + 1
            t0 = time.perf_counter()
            await ins.failed_query_by_scan(FailedFilter(queue="q3"), 1, snapshot=hw)
            return (time.perf_counter() - t0) * 1e3
        finally:
            await client.aclose()

    return asyncio.run(once())


def _get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise BenchError(f"GET {path}: {resp.status} {body[:200]!r}")
    return int(resp.headers["X-Total-Count"])


def _timed(conn: http.client.HTTPConnection, path: str, requests: int) -> list[float]:
    out = []
    t_next = time.monotonic_ns()
    for _ in range(requests):
        sleep_until_ns(t_next)
        t0 = time.perf_counter()
        _get(conn, path)
        out.append((time.perf_counter() - t0) * 1e3)
        t_next += 50_000_000  # 20 requests a second
    return out


def _row(subject: str, ms: list[float], n: dict[str, Any], what: str, extra: dict[str, Any]) -> Row:
    s = sorted(ms)
    return Row(
        BENCH,
        subject,
        "api_failed_ms",
        "ms",
        ms,
        producers=n["jobs"],
        note=f"{n['jobs']:,} failed jobs on one host, {what}",
        extra={**extra, "p99": round(percentile(s, 99), 3), "p90": round(percentile(s, 90), 3)},
    )
