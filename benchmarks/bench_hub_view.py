"""hub_view: the hub dashboard at 10 hosts x 100 queues, and Redis cost vs Sidekiq-style counting.

Part 1, ``/queues/api/stats`` of ``qdash-mp hub`` (a real process) over one keep-alive
connection, 10 hosts x 100 queues in a private redis-server, written with
``qdash_mp.hub.format`` as 10 publishers write them (queue records with ~60-bucket runtime
and wait histograms, host info, seq):

    hub_stats_static   nobody publishes: every request is the Redis round trip for the
                       hosts' seqs plus the cached JSON
    hub_stats_live     a publisher process rewrites every host's 100 queue records (all
                       changed) with seq + 1, each host once a second at its own phase, as
                       10 busy collectors do; the hub re-reads, decodes and merges
                       ~1,000 records a second while the requests run

Samples are single requests (~50 a second); the target is on the median of the live row,
p99 in the row's extra.

Part 2, the same workload counted two ways, ``workers`` processes each doing ``rate`` jobs/s
(pushed + processed with a runtime; 1 % failed) on 10 queues for ``seconds``:

    sidekiq_style  every worker sends, per job, one pipeline of HINCRBYs to Redis (pushed,
                   processed, runtime bucket; failed + ZADD into a retry set) -- what the
                   peers do
    qdash_mp       hooks -> a local collector (``--hub`` to the same Redis) -> one publish
                   a second

Metrics per subject: ``redis_ops_per_s`` (Redis ``total_commands_processed`` over the
window: for qdash_mp the ~1 EVALSHA a second *and* the writes inside the script, most of
them the failed-job index and payload copies, 3 per failed job) and ``worker_cpu_pct`` (the
workers' own CPU, all threads, % of one core, summed); the qdash_mp rows carry the paired
ratio qdash_mp / sidekiq_style. The collector's CPU is in the qdash_mp row's extra (it is
not the workers', but it is not free either).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from _common import (
    BenchError,
    Config,
    Row,
    cpu_seconds,
    paired_ratios,
    percentile,
    progress,
    say,
    short_dir,
    sleep_until_ns,
    start_collector,
    start_hub,
    start_redis,
    wait_go,
    worker_main,
    workers,
)

BENCH = "hub_view"
HOSTS = 10
QUEUES = 100


def sizes(cfg: Config) -> dict[str, Any]:
    if cfg.quick:
        return {"requests": 150, "workers": 2, "rate": 1000, "seconds": 3.0, "repeats": 1}
    return {"requests": 1500, "workers": 4, "rate": 2500, "seconds": 10.0, "repeats": 3}


def run(cfg: Config) -> list[Row]:
    n = sizes(cfg)
    rows = _hub_stats(cfg, n)
    rows += _redis_cost(cfg, n)
    return rows


# --- part 1: /queues/api/stats -----------------------------------------------------------------


def _host_records(rnd: random.Random, seq: int) -> dict[str, bytes]:
    from qdash_mp.histogram import NBUCKETS, count_values
    from qdash_mp.hub.format import QueueRecord, encode_queue, sparse

    out = {}
    for q in range(QUEUES):
        rt = [0] * NBUCKETS
        wt = [0] * NBUCKETS
        count_values(rt, [rnd.lognormvariate(-4, 1.5) for _ in range(200)])
        count_values(wt, [rnd.lognormvariate(-2, 2.0) for _ in range(200)])
        n = 1000 * seq + q
        rec = QueueRecord(n + 10, n, n // 100, 3, q % 4, float(q), sparse(rt), sparse(wt))
        out[f"queue-{q:03d}"] = encode_queue(rec)
    return out


def _publish(r: Any, host: str, seq: int, records: dict[str, bytes]) -> None:
    from qdash_mp.hub.format import HostInfo, encode_host
    from qdash_mp.hub.keys import Keys

    k = Keys()
    pipe = r.pipeline(transaction=True)
    pipe.hset(k.q(host), mapping=records)
    pipe.hset(k.hosts, host, encode_host(HostInfo(seq, time.time(), 1.0, "bench", 1)))
    pipe.hset(k.seq, host, seq)
    pipe.execute()


def _hub_stats(cfg: Config, n: dict[str, Any]) -> list[Row]:
    import redis

    rows = []
    with contextlib.ExitStack() as stack:
        server = start_redis(stack, cfg)
        url = f"redis://127.0.0.1:{server.port}/0"
        r = redis.Redis(port=server.port)
        stack.callback(r.close)
        rnd = random.Random(7)
        for h in range(HOSTS):
            _publish(r, f"host{h:02d}", 1, _host_records(rnd, 1))
        base = start_hub(stack, url)
        conn = _connect(base)
        stack.callback(conn.close)
        doc = _get(conn, "/queues/api/stats")
        if len(doc) < 1000 or b'"host09"' not in doc:
            raise BenchError("hub /queues/api/stats lacks the hosts")
        progress(f"hub_view: /queues/api/stats, {HOSTS} hosts x {QUEUES} queues, static")
        static = _timed(conn, n["requests"])
        rows.append(_latency_row("hub_stats_static", static, "nobody publishing"))
        progress("hub_view: /queues/api/stats while 10 hosts publish 100 changed queues/s")
        params = [{"port": server.port, "seconds": n["requests"] / 50 + 30}]
        with workers("bench_hub_view.py", "publisher", params) as (w,):
            w.go()
            time.sleep(2.0)  # every host has published at least once
            live = _timed(conn, n["requests"])
            w.close()
        rows.append(
            _latency_row("hub_stats_live", live, "10 hosts publishing all 100 queues each second")
        )
    return rows


def _connect(base: str) -> http.client.HTTPConnection:
    u = urlsplit(base)
    return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)


def _get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise BenchError(f"GET {path}: {resp.status} {body[:200]!r}")
    return body


def _timed(conn: http.client.HTTPConnection, requests: int) -> list[float]:
    out = []
    t_next = time.monotonic_ns()
    for _ in range(requests):
        sleep_until_ns(t_next)
        t0 = time.perf_counter()
        _get(conn, "/queues/api/stats")
        out.append((time.perf_counter() - t0) * 1e3)
        t_next += 20_000_000  # 50 requests a second
    return out


def _latency_row(subject: str, ms: list[float], note: str) -> Row:
    s = sorted(ms)
    return Row(
        BENCH,
        subject,
        "api_stats_ms",
        "ms",
        ms,
        producers=HOSTS * QUEUES,
        note=f"{HOSTS} hosts x {QUEUES} queues, {note}",
        extra={"p99": round(percentile(s, 99), 3), "p90": round(percentile(s, 90), 3)},
    )


def _publisher(p: dict[str, Any]) -> None:
    """Worker: 10 hosts publishing every queue changed, each once a second at its phase."""
    import redis

    r = redis.Redis(port=int(p["port"]))
    rnd = random.Random(11)
    blobs = [_host_records(rnd, s) for s in range(2, 5)]  # rotate: every publish changes
    say(ready=True)
    wait_go()
    deadline = time.monotonic() + float(p["seconds"])
    t0 = time.monotonic_ns()
    seq = 2
    while time.monotonic() < deadline:
        for h in range(HOSTS):
            sleep_until_ns(t0 + (seq - 2) * 1_000_000_000 + h * 100_000_000)
            _publish(r, f"host{h:02d}", seq, blobs[seq % len(blobs)])
            if _stdin_closed():  # the orchestrator is done measuring
                r.close()
                return
        seq += 1
    r.close()


def _stdin_closed() -> bool:
    import select

    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and not sys.stdin.readline()


# --- part 2: Redis ops and worker CPU ----------------------------------------------------------


def _redis_cost(cfg: Config, n: dict[str, Any]) -> list[Row]:
    import redis

    samples: dict[str, dict[str, list[float]]] = {
        s: {"ops": [], "cpu": [], "jobs": [], "collector": []}
        for s in ("sidekiq_style", "qdash_mp")
    }
    with contextlib.ExitStack() as stack:
        server = start_redis(stack, cfg)
        url = f"redis://127.0.0.1:{server.port}/0"
        r = redis.Redis(port=server.port)
        stack.callback(r.close)
        collector, _ = start_collector(
            stack, short_dir(stack, cfg, "qdh"), "--hub", url, "--host-name", "bench"
        )
        assert collector.proc is not None
        for rep in range(n["repeats"]):
            for subject in ("sidekiq_style", "qdash_mp"):
                progress(
                    f"hub_view: {subject}, {n['workers']} workers x {n['rate']} jobs/s, "
                    f"repeat {rep + 1}/{n['repeats']}"
                )
                params = [
                    {
                        "mode": subject,
                        "port": server.port,
                        "socket": collector.socket,
                        "rate": n["rate"],
                        "seconds": n["seconds"],
                        "seed": k,
                    }
                    for k in range(n["workers"])
                ]
                with workers("bench_hub_view.py", "jobs", params) as ws:
                    ops0 = int(r.info("stats")["total_commands_processed"])
                    col0 = cpu_seconds(collector.proc.pid)
                    t0 = time.monotonic()
                    for w in ws:
                        w.go()
                    results = [w.read(timeout=n["seconds"] + 300) for w in ws]
                    took = time.monotonic() - t0
                    ops1 = int(r.info("stats")["total_commands_processed"])
                    col1 = cpu_seconds(collector.proc.pid)
                s = samples[subject]
                s["ops"].append((ops1 - ops0 - 1) / took)  # the first INFO counts itself
                s["cpu"].append(100.0 * sum(x["cpu"] for x in results) / took)
                s["jobs"].append(sum(x["jobs"] for x in results) / took)
                s["collector"].append(100.0 * (col1 - col0) / took)
    rows = []
    for subject in ("sidekiq_style", "qdash_mp"):
        s = samples[subject]
        ref = None if subject == "sidekiq_style" else samples["sidekiq_style"]
        note = f"{n['workers']} workers x {n['rate']} jobs/s, 10 queues, 1% failed"
        extra = {"jobs_per_s": [round(x) for x in s["jobs"]]}
        if subject == "qdash_mp":
            extra["collector_core_pct"] = [round(x, 2) for x in s["collector"]]
        for metric, unit, key in (
            ("redis_ops_per_s", "ops/s", "ops"),
            ("worker_cpu_pct", "%", "cpu"),
        ):
            rows.append(
                Row(
                    BENCH,
                    subject,
                    metric,
                    unit,
                    s[key],
                    reference=None if ref is None else "sidekiq_style",
                    ratios=[] if ref is None else paired_ratios(s[key], ref[key]),
                    note=note,
                    extra=extra,
                )
            )
    return rows


def _jobs(p: dict[str, Any]) -> None:
    """Worker: ``rate`` jobs/s for ``seconds``, counted the ``mode`` way."""
    rate, seconds, mode = int(p["rate"]), float(p["seconds"]), str(p["mode"])
    rnd = random.Random(int(p["seed"]))
    queues = [f"queue-{q}" for q in range(10)]
    runtimes = [rnd.lognormvariate(-4, 1.5) for _ in range(4096)]
    if mode == "sidekiq_style":
        import redis

        from qdash_mp.histogram import bucket_of

        r = redis.Redis(port=int(p["port"]))

        def job(i: int) -> None:
            q = queues[i % 10]
            pipe = r.pipeline(transaction=False)
            pipe.hincrby(f"stat:{q}", "pushed", 1)
            if i % 100 == 99:  # Sidekiq: the failure counter and the job into its retry set
                pipe.hincrby(f"stat:{q}", "failed", 1)
                pipe.zadd("retry", {f"{p['seed']}-{i}:{q}:boom": time.time()})
            else:
                pipe.hincrby(f"stat:{q}", "processed", 1)
                pipe.hincrby(f"rt:{q}", str(bucket_of(runtimes[i & 4095])), 1)
            pipe.execute()

        close = r.close
    else:
        from qdash_mp import Client, Job

        c = Client(str(p["socket"]))

        def job(i: int) -> None:
            q = queues[i % 10]
            c.on_pushed(q)
            if i % 100 == 99:
                c.on_failed(q, Job(f"{p['seed']}-{i}", "Task"), "boom")
            else:
                c.on_processed(q, runtime=runtimes[i & 4095])

        def close() -> None:
            if not c.flush(timeout=120):
                raise BenchError("qdash_mp client did not flush")
            c.close()

    say(ready=True)
    wait_go()
    batch = max(1, rate // 100)  # paced in 10 ms steps
    total = int(rate * seconds)
    t0 = time.monotonic_ns()
    c0 = time.process_time()
    i = 0
    while i < total:
        for _ in range(min(batch, total - i)):
            job(i)
            i += 1
        sleep_until_ns(t0 + int(i / rate * 1e9))
    close()
    say(jobs=i, cpu=time.process_time() - c0)


if __name__ == "__main__":
    worker_main({"publisher": _publisher, "jobs": _jobs})
