"""durable_failed: failed-job records made durable, 4 producer processes, vs sqlite and Redis.

Every subject stores the same records -- id, queue, name, a 200-byte payload, attempts,
error text, failed_at -- from 4 processes, and the clock runs from the moment the
orchestrator releases them until the last one has its records durable and acknowledged:

    qdash_mp          ``client.on_failed(queue, job, error)`` for each record (``Job`` objects
                      built before the clock starts), then ``client.flush()``, which returns
                      True only once the collector has journaled (fdatasync) and acknowledged
                      every record. Checked afterwards: the shared-memory failed count of the
                      run's queue and the journal's total (``/queues/api/failed``) are exact.
    sqlite_wal_batch  one database file, ``journal_mode=WAL``, ``synchronous=NORMAL``, table
                      ``failed(id TEXT PRIMARY KEY, queue, name, payload BLOB, attempts,
                      error, failed_at)``; each process inserts batches of 1000 rows
                      (``BEGIN IMMEDIATE``, ``executemany``, ``COMMIT``). Note: WAL with
                      NORMAL does not fsync at commit (only at checkpoints), so it survives a
                      process crash but not a power cut -- a weaker promise than qdash_mp's.
    sqlite_wal_full   the same database, schema, batches and processes with
                      ``synchronous=FULL``: the WAL is fsynced at every COMMIT before it
                      returns -- the like-for-like durable peer (qdash_mp fdatasyncs its
                      journal before it acknowledges).
    redis_aof_always  a private redis-server with ``appendonly yes``, ``appendfsync always``;
                      each process sends ``XADD failed * field value...`` pipelined (no MULTI)
                      in batches of 1000; Redis fsyncs the AOF before it replies.

Repeats run the four subjects back to back, in an order rotated every repeat, and the ratios
to sqlite_wal_batch (and, for qdash_mp, to sqlite_wal_full) are taken within each repeat.

Ack latency at a fixed 10k failures/s: 4 producers, each paced at 2.5k failures/s on a fixed
schedule (a group of 10 failures every 4 ms; a late group does not shift the later ones).
After each group the producer calls ``client.flush()``; a failure's latency is the time from
just before its ``on_failed`` call to the return of that ``flush()`` -- the first moment the
worker can know its record is durable. Latencies of all producers are pooled per repeat;
p50/p99 are medians over repeats.

Collector CPU per record (``collector_cpu``, µs): the collector's CPU time (its threads'
``schedstat``, as in ``ingest``) from just before the qdash_mp producers are started (their
connections and warm-up flush fall in the window: a trifle) until every producer's flush
returned, divided by the records of the repeat. The collector decodes,
stages and commits under one GIL, so this figure bounds its rate: 1e6 / it records/s on a
free core, whatever the disk does. ``flush()`` sends at once; without it a client batches for
up to its ``flush_interval`` (100 ms) -- that delay is a client setting, not measured here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Config,
    Row,
    Skip,
    cpu_seconds,
    cpu_seconds_fine,
    go_all,
    paired_ratios,
    percentile,
    progress,
    say,
    short_dir,
    skipped_row,
    sleep_until_ns,
    start_collector,
    start_redis,
    wait_go,
    worker_main,
    workers,
)

BENCH = "durable_failed"
PRODUCERS = 4
BATCH = 1000
PAYLOAD_BYTES = 200
ERROR = "RuntimeError: boom"
RATE_PER_PRODUCER = 2500
GROUP = 10
TIMEOUT = 300.0
SUBJECTS = ("qdash_mp", "sqlite_wal_batch", "sqlite_wal_full", "redis_aof_always")
SQLITE_SYNC = {"sqlite_wal_batch": "NORMAL", "sqlite_wal_full": "FULL"}


def sizes(cfg: Config) -> tuple[int, int, float, int]:
    """(records per producer, repeats, latency seconds per repeat, latency repeats)."""
    return (12_500, 2, 2.0, 1) if cfg.quick else (50_000, 5, 5.0, 3)


def _payloads() -> list[str]:
    """64 distinct 200-byte payloads (record i gets number i % 64)."""
    return [os.urandom(PAYLOAD_BYTES // 2).hex() for _ in range(64)]


# ---------------------------------------------------------------------- orchestrator


def run(cfg: Config) -> list[Row]:
    count, repeats, lat_seconds, lat_repeats = sizes(cfg)
    rates: dict[str, list[float]] = {s: [] for s in SUBJECTS}
    skips: dict[str, str] = {}
    p50s: list[float] = []
    p99s: list[float] = []
    achieved: list[float] = []
    phases: dict[str, list[float]] = {"calls_done_s": [], "acked_s": []}
    cpu_us: list[float] = []  # collector CPU per record, per qdash_mp repeat
    with contextlib.ExitStack() as stack:
        collector, _ = start_collector(stack, short_dir(stack, cfg, "qdf"))
        try:
            redis_port = start_redis(stack, cfg, aof_always=True).port
        except Skip as exc:
            skips["redis_aof_always"] = str(exc)
        sqlite_dir = short_dir(stack, cfg, "qds")
        from qdash_mp.shm import SharedStatsReader

        reader = SharedStatsReader(collector.shm)
        stack.callback(reader.close)
        journaled = 0
        progress(
            f"durable_failed: {repeats} repeats x {PRODUCERS} producers x {count:,} records "
            f"({PAYLOAD_BYTES}-byte payloads)"
        )
        for rep in range(repeats):
            k = rep % len(SUBJECTS)
            order = SUBJECTS[k:] + SUBJECTS[:k]
            for subject in order:
                if subject in skips:
                    continue
                tag = f"r{rep}"
                if subject == "qdash_mp":
                    cpu0 = _collector_cpu(collector)
                    rate = _run_qdash(collector, reader, count, tag, phases)
                    cpu_us.append((_collector_cpu(collector) - cpu0) / (PRODUCERS * count) * 1e6)
                    journaled += PRODUCERS * count
                    total = _journal_total(collector.http)
                    if total != journaled:
                        raise BenchError(f"journal holds {total} failed jobs, expected {journaled}")
                elif subject in SQLITE_SYNC:
                    db = sqlite_dir / f"{tag}-{SQLITE_SYNC[subject]}.db"
                    rate = _run_sqlite(db, count, tag, SQLITE_SYNC[subject])
                else:
                    rate = _run_redis(redis_port, count, tag)
                rates[subject].append(rate)
                progress(f"durable_failed: repeat {rep + 1}/{repeats} {subject}: {rate:,.0f}/s")
        progress(
            f"durable_failed: ack latency, {PRODUCERS} x {RATE_PER_PRODUCER}/s, flush every "
            f"{GROUP} failures, {lat_repeats} x {lat_seconds:g}s"
        )
        for rep in range(lat_repeats):
            p50, p99, rate = _run_latency(collector.socket, lat_seconds, f"l{rep}")
            p50s.append(p50)
            p99s.append(p99)
            achieved.append(rate)
            progress(
                f"durable_failed: latency repeat {rep + 1}/{lat_repeats}: p50 {p50:.2f} ms, "
                f"p99 {p99:.2f} ms at {rate:,.0f} failures/s"
            )
    rows = []
    ref = rates["sqlite_wal_batch"]
    for subject in SUBJECTS:
        if subject in skips:
            rows.append(
                skipped_row(
                    BENCH, subject, "records/s", "records/s", skips[subject], producers=PRODUCERS
                )
            )
            continue
        rows.append(
            Row(
                BENCH,
                subject,
                "records/s",
                "records/s",
                samples=rates[subject],
                producers=PRODUCERS,
                reference="sqlite_wal_batch",
                ratios=paired_ratios(rates[subject], ref),
                extra={"records_per_producer": count, "payload_bytes": PAYLOAD_BYTES},
            )
        )
        if subject == "qdash_mp" and "sqlite_wal_full" not in skips:
            rows[-1].more_ratios["sqlite_wal_full"] = paired_ratios(
                rates[subject], rates["sqlite_wal_full"]
            )
        if subject in SQLITE_SYNC:
            rows[-1].extra["synchronous"] = SQLITE_SYNC[subject]
        if subject == "qdash_mp":
            # Where the time went: until the last on_failed() call returned, until acked.
            rows[-1].extra.update({k: [round(x, 3) for x in v] for k, v in phases.items()})
    rows.append(
        Row(
            BENCH,
            "qdash_mp",
            "collector_cpu",
            "us/record",
            cpu_us,
            PRODUCERS,
            note="collector CPU (its threads' schedstat) per record, start to last ack",
        )
    )
    lat_note = f"at {PRODUCERS}x{RATE_PER_PRODUCER}/s, flush() after every {GROUP} failures"
    extra = {"achieved_rate": [round(r) for r in achieved]}
    rows.append(
        Row(BENCH, "qdash_mp", "ack_p50", "ms", p50s, PRODUCERS, note=lat_note, extra=extra)
    )
    rows.append(
        Row(BENCH, "qdash_mp", "ack_p99", "ms", p99s, PRODUCERS, note=lat_note, extra=extra)
    )
    return rows


def _collector_cpu(collector: Any) -> float:
    pid: int = collector.proc.pid
    fine = cpu_seconds_fine(pid)
    return cpu_seconds(pid) if fine is None else fine


def _journal_total(http: str) -> int:
    with urllib.request.urlopen(f"{http}/queues/api/failed?page=1", timeout=30) as resp:
        total: int = json.load(resp)["total"]
        return total


def _run_qdash(
    collector: Any, reader: Any, count: int, tag: str, phases: dict[str, list[float]]
) -> float:
    queue = f"failed-{tag}"
    params = [
        {"socket": collector.socket, "queue": queue, "count": count, "prefix": f"{tag}-{i}"}
        for i in range(PRODUCERS)
    ]
    with workers(__file__, "qdash", params) as ws:
        t0 = go_all(ws)
        results = [w.read(TIMEOUT)["result"] for w in ws]
    if not all(r["flushed"] for r in results):
        raise BenchError("qdash_mp: a producer's client.flush() did not succeed")
    if any(r["dropped"] for r in results):
        raise BenchError("qdash_mp: a client dropped failed-job details (pending list full)")
    failed = sum(s.failed for s in reader.snapshot().queues if s.queue == queue)
    if failed != PRODUCERS * count:
        raise BenchError(f"qdash_mp: collector counted {failed} failures, not {PRODUCERS * count}")
    t1: int = max(r["t_flushed"] for r in results)
    calls_done = max(r["t_calls"] for r in results)
    phases["calls_done_s"].append((calls_done - t0) / 1e9)
    phases["acked_s"].append((t1 - t0) / 1e9)
    return PRODUCERS * count / ((t1 - t0) / 1e9)


def _run_sqlite(db: Path, count: int, tag: str, synchronous: str) -> float:
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(
        "CREATE TABLE failed (id TEXT PRIMARY KEY, queue TEXT NOT NULL, name TEXT NOT NULL, "
        "payload BLOB, attempts INTEGER, error TEXT, failed_at REAL)"
    )
    con.commit()
    params = [
        {"db": str(db), "count": count, "prefix": f"{tag}-{i}", "synchronous": synchronous}
        for i in range(PRODUCERS)
    ]
    with workers(__file__, "sqlite", params) as ws:
        t0 = go_all(ws)
        results = [w.read(TIMEOUT)["result"] for w in ws]
    (n,) = con.execute("SELECT count(*) FROM failed").fetchone()
    con.close()
    if n != PRODUCERS * count:
        raise BenchError(f"sqlite holds {n} rows, expected {PRODUCERS * count}")
    t1: int = max(r["t_done"] for r in results)
    return PRODUCERS * count / ((t1 - t0) / 1e9)


def _run_redis(port: int, count: int, tag: str) -> float:
    import redis

    key = f"failed-{tag}"
    params = [
        {"port": port, "key": key, "count": count, "prefix": f"{tag}-{i}"} for i in range(PRODUCERS)
    ]
    with workers(__file__, "redis", params) as ws:
        t0 = go_all(ws)
        results = [w.read(TIMEOUT)["result"] for w in ws]
    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        n = r.xlen(key)
        r.delete(key)  # keep the server's memory flat across repeats
    finally:
        r.close()
    if n != PRODUCERS * count:
        raise BenchError(f"redis stream holds {n} entries, expected {PRODUCERS * count}")
    t1: int = max(r["t_done"] for r in results)
    return PRODUCERS * count / ((t1 - t0) / 1e9)


def _run_latency(socket: str, seconds: float, tag: str) -> tuple[float, float, float]:
    params = [
        {
            "socket": socket,
            "queue": f"latency-{tag}",
            "seconds": seconds,
            "prefix": f"{tag}-{i}",
        }
        for i in range(PRODUCERS)
    ]
    with workers(__file__, "latency", params) as ws:
        t0 = go_all(ws)
        results = [w.read(TIMEOUT)["result"] for w in ws]
    if not all(r["flushed"] for r in results):
        raise BenchError("qdash_mp: a latency producer's flush() did not succeed")
    lat = sorted(x for r in results for x in r["lat_us"])
    t1 = max(r["t_end"] for r in results)
    rate = len(lat) / ((t1 - t0) / 1e9)
    return percentile(lat, 50) / 1000, percentile(lat, 99) / 1000, rate


# ---------------------------------------------------------------------- workers


def _qdash_producer(p: dict[str, Any]) -> None:
    from qdash_mp import Client, Job

    client = Client(p["socket"])
    client.on_processed("warm-up")
    if not client.flush(timeout=30):
        raise BenchError("warm-up flush failed")
    payloads = _payloads()
    prefix = p["prefix"]
    jobs = [
        Job(id=f"{prefix}-{i}", name="Task", payload=payloads[i % 64], attempts=1)
        for i in range(p["count"])
    ]
    on_failed, q = client.on_failed, p["queue"]
    say(ready=True)
    wait_go()
    t_go = time.monotonic_ns()
    for job in jobs:
        on_failed(q, job, ERROR)
    t_calls = time.monotonic_ns()
    flushed = client.flush(timeout=TIMEOUT)
    t_flushed = time.monotonic_ns()
    say(
        result={
            "t_go": t_go,
            "t_calls": t_calls,
            "t_flushed": t_flushed,
            "flushed": flushed,
            "dropped": client.dropped_failed,
        }
    )
    client.close()


def _rows(p: dict[str, Any]) -> list[tuple[Any, ...]]:
    payloads = [x.encode() for x in _payloads()]
    prefix, now = p["prefix"], time.time()
    return [
        (f"{prefix}-{i}", "failed", "Task", payloads[i % 64], 1, ERROR, now)
        for i in range(p["count"])
    ]


def _sqlite_producer(p: dict[str, Any]) -> None:
    con = sqlite3.connect(p["db"], timeout=TIMEOUT, isolation_level=None)
    sync = p["synchronous"]
    if sync not in ("NORMAL", "FULL"):
        raise BenchError(f"unexpected synchronous={sync!r}")
    con.execute(f"PRAGMA synchronous={sync}")
    (got,) = con.execute("PRAGMA synchronous").fetchone()
    if got != {"NORMAL": 1, "FULL": 2}[sync]:  # the setting is per connection: check it took
        raise BenchError(f"sqlite: PRAGMA synchronous is {got}, not {sync}")
    (mode,) = con.execute("PRAGMA journal_mode").fetchone()
    if mode != "wal":
        raise BenchError(f"sqlite: journal_mode is {mode}, not wal")
    rows = _rows(p)
    sql = "INSERT INTO failed VALUES (?, ?, ?, ?, ?, ?, ?)"
    say(ready=True)
    wait_go()
    t_go = time.monotonic_ns()
    for i in range(0, len(rows), BATCH):
        con.execute("BEGIN IMMEDIATE")
        con.executemany(sql, rows[i : i + BATCH])
        con.execute("COMMIT")
    say(result={"t_go": t_go, "t_done": time.monotonic_ns()})
    con.close()


def _redis_producer(p: dict[str, Any]) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=p["port"])
    r.ping()
    fields: list[dict[Any, Any]] = [
        {"id": i, "queue": q, "name": n, "payload": pl, "attempts": a, "error": e, "failed_at": t}
        for i, q, n, pl, a, e, t in _rows(p)
    ]
    pipe = r.pipeline(transaction=False)
    xadd, execute, key = pipe.xadd, pipe.execute, p["key"]
    say(ready=True)
    wait_go()
    t_go = time.monotonic_ns()
    for i in range(0, len(fields), BATCH):
        for f in fields[i : i + BATCH]:
            xadd(key, f)
        execute()
    say(result={"t_go": t_go, "t_done": time.monotonic_ns()})
    r.close()


def _latency_producer(p: dict[str, Any]) -> None:
    from qdash_mp import Client, Job

    client = Client(p["socket"])
    client.on_processed("warm-up")
    if not client.flush(timeout=30):
        raise BenchError("warm-up flush failed")
    payloads = _payloads()
    prefix, q = p["prefix"], p["queue"]
    groups = int(p["seconds"] * RATE_PER_PRODUCER / GROUP)
    period = int(GROUP * 1e9 / RATE_PER_PRODUCER)
    jobs = [
        Job(id=f"{prefix}-{i}", name="Task", payload=payloads[i % 64], attempts=1)
        for i in range(groups * GROUP)
    ]
    on_failed, flush, clock = client.on_failed, client.flush, time.monotonic_ns
    lat: list[int] = []
    flushed = True
    say(ready=True)
    wait_go()
    start = clock()
    for g in range(groups):
        sleep_until_ns(start + g * period)
        sent = []
        for job in jobs[g * GROUP : (g + 1) * GROUP]:
            sent.append(clock())
            on_failed(q, job, ERROR)
        flushed = flush(timeout=TIMEOUT) and flushed
        t_ack = clock()
        lat.extend((t_ack - t) // 1000 for t in sent)
    say(result={"lat_us": lat, "flushed": flushed, "t_end": clock()})
    client.close()


if __name__ == "__main__":
    worker_main(
        {
            "qdash": _qdash_producer,
            "sqlite": _sqlite_producer,
            "redis": _redis_producer,
            "latency": _latency_producer,
        }
    )
