"""ingest: end-to-end hook throughput, 1, 2 and 4 producer processes, exact to the unit.

qdash_mp: N producer processes, each with its own ``Client`` (connected before the clock
starts), make M hook calls each (``on_pushed(q)``, ``on_processed(q)`` alternately), then
call ``client.flush()`` as a worker does when it finishes a burst. The clock runs from the
moment the orchestrator releases the producers until a ``SharedStatsReader`` on the
collector's shared memory (polled every 2 ms) shows the run's queue with exactly N*M/2
pushed and N*M/2 processed. A run that overshoots, or that does not settle at exactly that
count once every producer has flushed, fails the benchmark.

qdash_mp_runtime (N=4 only): the same, but ``on_processed(q, runtime=rt)`` with M/2 *distinct*
log-normal runtimes (~20 ms median, drawn before the clock starts; the deferred runtime path):
exact means pushed and processed at N*M/2 and, once the shared stats carry runtime
histograms, the runtime histogram's count too (and its summary equal to the sent runtimes',
checked after the run). Distinct like real measured runtimes: an earlier version cycled 64
values, which flatters any bucketing that gains from repeats (a sort: ~4x cheaper a value).

redis_pipeline: the same N, the same call mix -- ``HINCRBY key pushed 1`` /
``HINCRBY key processed 1`` -- pipelined (no MULTI) and executed every 1000 calls, into one
private redis-server; the clock runs until ``HMGET`` (polled every 2 ms) shows the exact
totals. Its producers make fewer calls (``M_REDIS``) than qdash_mp's: at its rate the same
M would take minutes a run; its rate does not depend on the count, and a shorter run can
only flatter it (a fixed end-to-end delay weighs more in a short run).

Each repeat runs both subjects for each N back to back (their order swapped every repeat);
the ratio is taken within each (repeat, N) pair.

Collector cost: around each qdash_mp run the orchestrator reads the collector process's
CPU time just before it releases the producers and again once every producer has reported
its flush; ``collector_cpu`` is those CPU seconds per million hook calls, and
``collector_core_pct`` the same figure as the share of one core the collector would need at
10M hooks/s (``cpu_s_per_M * 10 * 100``). The CPU time is the sum of the collector's
threads' ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds): utime + stime from
``/proc/<pid>/stat`` count 10 ms ticks, and a quick run's 2-8M hooks cost the collector
only a few ticks (one tick is 1.25-5 % of a core at 10M hooks/s). The tick figure is kept
beside it (``stat_cpu_s_per_M``) as a cross-check; without schedstat it is the row.
"""

from __future__ import annotations

import contextlib
import random
import time
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
    progress,
    say,
    short_dir,
    skipped_row,
    start_collector,
    start_redis,
    wait_go,
    worker_main,
    workers,
)

BENCH = "ingest"
PRODUCERS = (1, 2, 4)
PIPELINE = 1000
POLL = 0.002
TIMEOUT = 300.0
RUNTIME_PRODUCERS = 4


def runtimes(k: int) -> list[float]:
    """The ``k`` runtimes each runtime producer sends (log-normal, ~20 ms median, distinct)."""
    rng = random.Random(9)
    return [rng.lognormvariate(-4.0, 1.0) for _ in range(k)]


def sizes(cfg: Config) -> tuple[int, int, int]:
    """(hook calls per qdash_mp producer, calls per redis producer, repeats)."""
    return (2_000_000, 50_000, 2) if cfg.quick else (4_000_000, 200_000, 5)


# ---------------------------------------------------------------------- orchestrator


def run(cfg: Config) -> list[Row]:
    m, m_redis, repeats = sizes(cfg)
    q_rates: dict[int, list[float]] = {n: [] for n in PRODUCERS}
    r_rates: dict[int, list[float]] = {n: [] for n in PRODUCERS}
    cpu_per_m: dict[int, list[float]] = {n: [] for n in PRODUCERS}
    ticks_per_m: dict[int, list[float]] = {n: [] for n in PRODUCERS}
    rt_rates: list[float] = []
    redis_skip: str | None = None
    with contextlib.ExitStack() as stack:
        collector, _ = start_collector(stack, short_dir(stack, cfg, "qdi"), "--no-http")
        assert collector.proc is not None
        pid = collector.proc.pid
        redis_port = 0
        try:
            redis_port = start_redis(stack, cfg).port
        except Skip as exc:
            redis_skip = str(exc)
        from qdash_mp.shm import SharedStatsReader

        reader = SharedStatsReader(collector.shm)
        stack.callback(reader.close)
        progress(
            f"ingest: {repeats} repeats x N={PRODUCERS}; qdash_mp {m:,} calls per producer, "
            f"redis_pipeline {m_redis:,}"
        )
        for rep in range(repeats):
            for n in PRODUCERS:
                order = ["qdash_mp", "redis_pipeline"]
                if rep % 2:
                    order.reverse()
                for subject in order:
                    if subject == "qdash_mp":
                        rate, cpu, ticks = _run_qdash(
                            collector.socket, pid, reader, n, m, f"r{rep}n{n}"
                        )
                        q_rates[n].append(rate)
                        cpu_per_m[n].append(cpu / (n * m / 1e6))
                        ticks_per_m[n].append(ticks / (n * m / 1e6))
                    elif redis_skip is None:
                        rate = _run_redis(redis_port, n, m_redis, f"r{rep}n{n}")
                        r_rates[n].append(rate)
                    else:
                        continue
                    progress(f"ingest: repeat {rep + 1}/{repeats} N={n} {subject}: {rate:,.0f}/s")
            n = RUNTIME_PRODUCERS
            rate, _, _ = _run_qdash(collector.socket, pid, reader, n, m, f"r{rep}rt", True)
            rt_rates.append(rate)
            progress(f"ingest: repeat {rep + 1}/{repeats} N={n} qdash_mp_runtime: {rate:,.0f}/s")
    rows = [
        Row(
            BENCH,
            "qdash_mp_runtime",
            "hooks/s",
            "hooks/s",
            samples=rt_rates,
            producers=RUNTIME_PRODUCERS,
            extra={"calls_per_producer": m, "exact": True},
        )
    ]
    for n in PRODUCERS:
        rows.append(
            Row(
                BENCH,
                "qdash_mp",
                "hooks/s",
                "hooks/s",
                samples=q_rates[n],
                producers=n,
                reference=None if redis_skip else "redis_pipeline",
                ratios=[] if redis_skip else paired_ratios(q_rates[n], r_rates[n]),
                extra={"calls_per_producer": m, "exact": True},
            )
        )
        note = "collector CPU (its threads' schedstat) per million hook calls"
        cross = {"stat_cpu_s_per_M": [round(x, 5) for x in ticks_per_m[n]]}
        rows.append(
            Row(
                BENCH,
                "qdash_mp",
                "collector_cpu",
                "s/M hooks",
                samples=cpu_per_m[n],
                producers=n,
                note=note,
                extra=cross,
            )
        )
        rows.append(
            Row(
                BENCH,
                "qdash_mp",
                "collector_core_pct",
                "% core@10M/s",
                samples=[x * 10 * 100 for x in cpu_per_m[n]],
                producers=n,
                note="share of one core the collector needs at 10M hooks/s",
            )
        )
        if redis_skip is not None:
            rows.append(
                skipped_row(BENCH, "redis_pipeline", "hooks/s", "hooks/s", redis_skip, producers=n)
            )
        else:
            rows.append(
                Row(
                    BENCH,
                    "redis_pipeline",
                    "hooks/s",
                    "hooks/s",
                    samples=r_rates[n],
                    producers=n,
                    reference="redis_pipeline",
                    ratios=[1.0] * len(r_rates[n]),
                    extra={"calls_per_producer": m_redis, "exact": True},
                )
            )
    return rows


def _run_qdash(
    socket: str, pid: int, reader: Any, n: int, m: int, tag: str, timed: bool = False
) -> tuple[float, float, float]:
    """(hooks/s, collector CPU seconds from the release to the last flush: fine, in ticks).

    ``timed``: the producers pass runtimes; once the shared stats have a runtime histogram
    its count must reach the processed count too (exact), and its buckets the expected ones.
    """
    queue = f"ingest-{tag}"
    half = m // 2
    want = n * half

    def totals() -> tuple[int, int]:
        for s in reader.snapshot().queues:
            if s.queue == queue:
                timed_count = getattr(getattr(s, "runtime", None), "count", None)
                if timed and timed_count is not None:
                    return s.pushed, min(s.processed, timed_count)
                return s.pushed, s.processed
        return 0, 0

    params = [{"socket": socket, "queue": queue, "calls": m, "timed": timed}] * n
    with workers(__file__, "qdash", params) as ws:
        fine0, ticks0 = cpu_seconds_fine(pid), cpu_seconds(pid)
        t0 = go_all(ws)
        deadline = time.monotonic() + TIMEOUT
        while True:
            pushed, processed = totals()
            if pushed > want or processed > want:
                raise BenchError(f"qdash_mp overcounted: {pushed}/{processed} > {want}")
            if pushed == want and processed == want:
                t1 = time.monotonic_ns()
                break
            if time.monotonic() > deadline:
                raise BenchError(f"qdash_mp: counts stuck at {pushed}/{processed} of {want}")
            time.sleep(POLL)
        results = [w.read()["result"] for w in ws]
        fine1, ticks1 = cpu_seconds_fine(pid), cpu_seconds(pid)
    if not all(r["flushed"] for r in results):
        raise BenchError("qdash_mp: a producer's client.flush() did not succeed")
    if totals() != (want, want):
        raise BenchError(f"qdash_mp: counts moved past exact after flush: {totals()} != {want}")
    if timed:
        _check_buckets(reader, queue, n, half)
    ticks = ticks1 - ticks0
    cpu = ticks if fine0 is None or fine1 is None else fine1 - fine0
    return 2 * want / ((t1 - t0) / 1e9), cpu, ticks


def _check_buckets(reader: Any, queue: str, n: int, half: int) -> None:
    """The collector's runtime summary equals that of the runtimes sent (count and every
    percentile's bucket), once the shared stats carry runtime histograms."""
    rows = [s for s in reader.snapshot().queues if s.queue == queue]
    got = getattr(rows[0], "runtime", None) if rows else None
    if got is None:
        return  # shared stats without runtime histograms yet: counts were checked
    from qdash_mp.histogram import NBUCKETS, bucket_of, summary

    want = [0] * NBUCKETS
    for x in runtimes(half):  # one by one: independent of the client's bulk bucketing
        want[bucket_of(x)] += 1
    expected = summary([c * n for c in want])
    fields = ("count", "p50", "p90", "p95", "p99")
    if [getattr(got, f) for f in fields] != [getattr(expected, f) for f in fields]:
        raise BenchError(f"qdash_mp_runtime: runtime summary {got} is not {expected}")


def _run_redis(port: int, n: int, m: int, tag: str) -> float:
    import redis

    key = f"ingest-{tag}"
    half = m // 2
    want = n * half
    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        r.delete(key)

        def totals() -> tuple[int, int]:
            pushed, processed = r.hmget(key, ["pushed", "processed"])
            return int(pushed or 0), int(processed or 0)

        params = [{"port": port, "key": key, "calls": m}] * n
        with workers(__file__, "redis", params) as ws:
            t0 = go_all(ws)
            deadline = time.monotonic() + TIMEOUT
            while True:
                pushed, processed = totals()
                if pushed > want or processed > want:
                    raise BenchError(f"redis overcounted: {pushed}/{processed} > {want}")
                if pushed == want and processed == want:
                    t1 = time.monotonic_ns()
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"redis: counts stuck at {pushed}/{processed} of {want}")
                time.sleep(POLL)
            for w in ws:
                w.read()
        if totals() != (want, want):
            raise BenchError(f"redis: counts moved past exact: {totals()} != {want}")
    finally:
        r.close()
    return 2 * want / ((t1 - t0) / 1e9)


# ---------------------------------------------------------------------- workers


def _qdash_producer(p: dict[str, Any]) -> None:
    from qdash_mp import Client

    client = Client(p["socket"])
    client.on_processed("warm-up")
    if not client.flush(timeout=30):  # connected and welcomed before the clock starts
        raise BenchError("warm-up flush failed")
    push, proc, q = client.on_pushed, client.on_processed, p["queue"]
    rounds = p["calls"] // 2
    times = runtimes(rounds) if p["timed"] else []
    say(ready=True)
    wait_go()
    t_go = time.monotonic_ns()
    if times:
        for rt in times:
            push(q)
            proc(q, runtime=rt)
    else:
        for _ in range(rounds):
            push(q)
            proc(q)
    t_calls = time.monotonic_ns()
    flushed = client.flush(timeout=TIMEOUT)
    t_flushed = time.monotonic_ns()
    say(result={"t_go": t_go, "t_calls": t_calls, "t_flushed": t_flushed, "flushed": flushed})
    client.close()


def _redis_producer(p: dict[str, Any]) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=p["port"])
    r.ping()
    pipe = r.pipeline(transaction=False)
    hincrby, execute, key = pipe.hincrby, pipe.execute, p["key"]
    batches = p["calls"] // PIPELINE
    say(ready=True)
    wait_go()
    t_go = time.monotonic_ns()
    for _ in range(batches):
        for _ in range(PIPELINE // 2):
            hincrby(key, "pushed", 1)
            hincrby(key, "processed", 1)
        execute()
    say(result={"t_go": t_go, "t_done": time.monotonic_ns()})
    r.close()


if __name__ == "__main__":
    worker_main({"qdash": _qdash_producer, "redis": _redis_producer})
