"""hook: the cost of one hook call in a worker's hot path, next to what users would pick instead.

Subjects, each measured as a loop of calls with the per-call target bound to a local first:

    dict            for _ in range(n): d[k] += 1                   (the floor)
    qdash_mp        inc = client.on_processed; for ...: inc(q)      (collector running)
    qdash_mp_runtime  inc = client.on_processed; for ...: inc(q, runtime=0.01)  (the deferred
                    runtime path: the float goes to a per-queue list the sender buckets)
    qdash_mp_job    for ...: start(q, job); done(q, job)   (on_started + on_processed with a
                    job: active, timed by the client; ns for the PAIR of calls)
    qdash_mp_no_collector   the same with no collector at the socket path: the counts pile
                    up in the client while its sender thread retries the connection
    qdash_mp_spool  the same, no collector, ``spool_dir`` set (counts stay in memory while
                    the hook runs -- only failed jobs past a bound go to disk early -- and
                    are spooled at ``close()``)
    prometheus_mp   labels = counter.labels; for ...: labels(q).inc()
                    (PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported)
    statsd          incr = statsd.incr; for ...: incr(name)       (UDP to 127.0.0.1, drained
                    by a thread of the orchestrating process, not of the measured one)
    redis_pipeline  hincrby = pipe.hincrby; 1000 x hincrby(key, field, 1), then
                    pipe.execute() (redis-py, pipeline without MULTI, private redis-server)

All subjects live in one worker process and take turns: each round runs one chunk of every
subject, in an order rotated every round, so machine noise lands on all of them alike. A
round gives each subject's ns/call and its ratio to ``dict`` *in that round*; the row is the
median over rounds. At the end the worker checks that the collector counted every
``on_processed`` call exactly, and every runtime in the runtime histogram once the shared
stats carry it (and redis every HINCRBY), that the collector-less clients
could not deliver (``flush()`` is False) and that the spooling one spooled at close.
The two collector-less rows replace a timed unit test (a hook stays about a dict increment
with or without a collector, with or without a spool): timing belongs here, not in tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Config,
    Row,
    Skip,
    Worker,
    paired_ratios,
    progress,
    say,
    short_dir,
    skipped_row,
    start_collector,
    start_redis,
    worker_main,
)

BENCH = "hook"
SUBJECTS = (
    "dict",
    "qdash_mp",
    "qdash_mp_runtime",
    "qdash_mp_job",
    "qdash_mp_no_collector",
    "qdash_mp_spool",
    "prometheus_mp",
    "statsd",
    "redis_pipeline",
)
QUEUE = "default"
QUEUE_RUNTIME = "runtime"
QUEUE_JOB = "jobs"
PIPELINE = 1000


def sizes(cfg: Config) -> tuple[int, int]:
    """(calls per subject, rounds)."""
    return (200_000, 10) if cfg.quick else (1_000_000, 20)


# ---------------------------------------------------------------------- orchestrator


class _UdpSink:
    """A real UDP socket on 127.0.0.1 that a thread reads and drops (a statsd stand-in)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.packets = 0
        self._stop = False
        self._thread = threading.Thread(target=self._drain, name="statsd-sink", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        buf = bytearray(65536)
        while not self._stop:
            try:
                self.sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            self.packets += 1

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.sock.close()


def run(cfg: Config) -> list[Row]:
    calls, rounds = sizes(cfg)
    with contextlib.ExitStack() as stack:
        collector, _ = start_collector(stack, short_dir(stack, cfg, "qdh"), "--no-http")
        skips: dict[str, str] = {}
        redis_port = 0
        try:
            redis_port = start_redis(stack, cfg).port
        except Skip as exc:
            skips["redis_pipeline"] = str(exc)
        sink = _UdpSink()
        stack.callback(sink.close)
        prom_dir = short_dir(stack, cfg, "qdp")
        absent_dir = short_dir(stack, cfg, "qda")
        params = {
            "socket": collector.socket,
            "absent_socket": str(absent_dir / "nobody.sock"),
            "spool_dir": str(absent_dir / "spool"),
            "shm": collector.shm,
            "redis_port": redis_port,
            "statsd_port": sink.port,
            "calls": calls,
            "rounds": rounds,
            "skips": skips,
        }
        progress(f"hook: {calls:,} calls per subject in {rounds} alternating rounds")
        w = Worker(__file__, "measure", params, env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})
        try:
            w.read()  # ready
            w.go()
            result = w.read()["result"]
        finally:
            w.close()
        statsd_sent = result["calls"].get("statsd", 0)
        if statsd_sent:
            time.sleep(0.2)  # let the sink drain what is still queued
    rows: list[Row] = []
    per_round: dict[str, list[float]] = result["ns_per_call"]
    skipped: dict[str, str] = result["skipped"]
    base = per_round["dict"]
    for subject in SUBJECTS:
        if subject in skipped:
            rows.append(skipped_row(BENCH, subject, "ns/call", "ns/call", skipped[subject]))
            continue
        row = Row(
            BENCH,
            subject,
            "ns/call",
            "ns/call",
            samples=per_round[subject],
            reference="dict",
            ratios=paired_ratios(per_round[subject], base),
            extra={"calls": result["calls"][subject]},
        )
        if subject == "statsd":
            row.extra["udp_packets_received"] = sink.packets
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- worker


def _subjects(p: dict[str, Any]) -> tuple[dict[str, Callable[[int], None]], dict[str, str], Any]:
    """Set up every subject that can run here: name -> chunk(n), name -> skip reason."""
    chunks: dict[str, Callable[[int], None]] = {}
    skipped: dict[str, str] = dict(p["skips"])
    checks: dict[str, Callable[[int], None]] = {}

    d: dict[str, int] = {}

    def dict_chunk(n: int, d: dict[str, int] = d, k: str = QUEUE) -> None:
        for _ in range(n):
            d[k] += 1

    d[QUEUE] = 0
    chunks["dict"] = dict_chunk

    def dict_check(total: int) -> None:
        if d[QUEUE] != total:
            raise BenchError(f"dict counted {d[QUEUE]}, expected {total}")

    checks["dict"] = dict_check

    from qdash_mp import Client

    client = Client(p["socket"])

    def qdash_chunk(n: int, inc: Any = client.on_processed, q: str = QUEUE) -> None:
        for _ in range(n):
            inc(q)

    chunks["qdash_mp"] = qdash_chunk

    def qdash_check(total: int) -> None:
        from qdash_mp.shm import SharedStatsReader

        if not client.flush(timeout=60):
            raise BenchError("qdash_mp: client.flush() did not succeed")
        with SharedStatsReader(p["shm"]) as reader:
            got = sum(s.processed for s in reader.snapshot().queues if s.queue == QUEUE)
        if got != total:
            raise BenchError(f"qdash_mp: collector counted {got} on_processed, expected {total}")
        client.close()

    checks["qdash_mp"] = qdash_check

    timed = Client(p["socket"])
    started = Client(p["socket"])

    def runtime_chunk(n: int, inc: Any = timed.on_processed, q: str = QUEUE_RUNTIME) -> None:
        for _ in range(n):
            inc(q, runtime=0.01)

    from qdash_mp.models import Job

    job = Job(id="bench-job", name="bench", payload=None)

    def job_chunk(
        n: int,
        start: Any = started.on_started,
        done: Any = started.on_processed,
        q: str = QUEUE_JOB,
        job: Any = job,
    ) -> None:
        for _ in range(n):
            start(q, job)
            done(q, job)

    chunks["qdash_mp_runtime"] = runtime_chunk
    chunks["qdash_mp_job"] = job_chunk

    def lifecycle_check(name: str, c: Any, queue: str) -> Callable[[int], None]:
        def check(total: int) -> None:
            from qdash_mp.shm import SharedStatsReader

            if not c.flush(timeout=60):
                raise BenchError(f"{name}: client.flush() did not succeed")
            with SharedStatsReader(p["shm"]) as reader:
                rows = [s for s in reader.snapshot().queues if s.queue == queue]
            got = sum(s.processed for s in rows)
            if got != total:
                raise BenchError(f"{name}: collector counted {got} on_processed, not {total}")
            # Once the shared stats carry runtime histograms (issue 9), they must be exact.
            timed_count = sum(getattr(getattr(s, "runtime", None), "count", total) for s in rows)
            if timed_count != total:
                raise BenchError(f"{name}: {timed_count} runtimes in the histogram, not {total}")
            c.close()

        return check

    checks["qdash_mp_runtime"] = lifecycle_check("qdash_mp_runtime", timed, QUEUE_RUNTIME)
    checks["qdash_mp_job"] = lifecycle_check("qdash_mp_job", started, QUEUE_JOB)

    absent = Client(p["absent_socket"])
    spooling = Client(p["absent_socket"], spool_dir=p["spool_dir"])

    def absent_chunk(n: int, inc: Any = absent.on_processed, q: str = QUEUE) -> None:
        for _ in range(n):
            inc(q)

    def spool_chunk(n: int, inc: Any = spooling.on_processed, q: str = QUEUE) -> None:
        for _ in range(n):
            inc(q)

    chunks["qdash_mp_no_collector"] = absent_chunk
    chunks["qdash_mp_spool"] = spool_chunk

    def absent_check(total: int) -> None:
        if absent.flush(timeout=0.2):
            raise BenchError("qdash_mp_no_collector: flush() succeeded with no collector")
        absent.close()

    def spool_check(total: int) -> None:
        if spooling.flush(timeout=0.2):
            raise BenchError("qdash_mp_spool: flush() succeeded with no collector")
        spooling.close()  # spools what the collector never acknowledged
        spooled = [f for f in Path(p["spool_dir"]).iterdir() if f.stat().st_size > 0]
        if not spooled:
            raise BenchError("qdash_mp_spool: close() spooled nothing")

    checks["qdash_mp_no_collector"] = absent_check
    checks["qdash_mp_spool"] = spool_check

    if "prometheus_mp" not in skipped:
        try:
            if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                raise Skip("PROMETHEUS_MULTIPROC_DIR is not set")
            import prometheus_client
        except ImportError:
            skipped["prometheus_mp"] = (
                "python package prometheus_client is not installed (pip install '.[bench]')"
            )
        except Skip as exc:
            skipped["prometheus_mp"] = str(exc)
        else:
            counter = prometheus_client.Counter(
                "jobs_processed", "Jobs processed", ["queue"], registry=None
            )

            def prom_chunk(n: int, labels: Any = counter.labels, q: str = QUEUE) -> None:
                for _ in range(n):
                    labels(q).inc()

            chunks["prometheus_mp"] = prom_chunk

            def prom_check(total: int) -> None:
                files = os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
                if not any(f.startswith("counter") for f in files):
                    raise BenchError("prometheus_client did not write its multiprocess files")
                got = counter.labels(QUEUE)._value.get()
                if got != total:
                    raise BenchError(f"prometheus_mp counted {got}, expected {total}")

            checks["prometheus_mp"] = prom_check

    if "statsd" not in skipped:
        try:
            import statsd
        except ImportError:
            skipped["statsd"] = "python package statsd is not installed (pip install '.[bench]')"
        else:
            sc = statsd.StatsClient("127.0.0.1", p["statsd_port"])

            def statsd_chunk(n: int, incr: Any = sc.incr, name: str = f"{QUEUE}.processed") -> None:
                for _ in range(n):
                    incr(name)

            chunks["statsd"] = statsd_chunk

    if "redis_pipeline" not in skipped:
        try:
            import redis
        except ImportError:
            skipped["redis_pipeline"] = (
                "python package redis is not installed (pip install '.[bench]')"
            )
        else:
            r = redis.Redis(host="127.0.0.1", port=p["redis_port"])
            r.delete("hook")
            pipe = r.pipeline(transaction=False)

            def redis_chunk(
                n: int, hincrby: Any = pipe.hincrby, execute: Any = pipe.execute, k: str = "hook"
            ) -> None:
                for _ in range(n // PIPELINE):
                    for _ in range(PIPELINE):
                        hincrby(k, QUEUE, 1)
                    execute()

            chunks["redis_pipeline"] = redis_chunk

            def redis_check(total: int) -> None:
                got = int(r.hget("hook", QUEUE) or 0)
                if got != total:
                    raise BenchError(f"redis counted {got}, expected {total}")
                r.close()

            checks["redis_pipeline"] = redis_check

    return chunks, skipped, checks


def _measure(p: dict[str, Any]) -> None:
    calls, rounds = p["calls"], p["rounds"]
    chunk = calls // rounds // PIPELINE * PIPELINE
    chunks, skipped, checks = _subjects(p)
    names = [s for s in SUBJECTS if s in chunks]
    say(ready=names)
    from _common import wait_go

    wait_go()
    warm = PIPELINE * 10
    for name in names:
        chunks[name](warm)
    ns: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = chunks[name]
            t0 = clock()
            fn(chunk)
            ns[name].append((clock() - t0) / chunk)
        print(
            f"  hook round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {ns[n][-1]:.0f}" for n in names)
            + " ns/call",
            file=sys.stderr,
            flush=True,
        )
    total = warm + rounds * chunk
    for name, check in checks.items():
        if name in chunks:
            check(total)
    say(
        result={
            "ns_per_call": ns,
            "skipped": skipped,
            "calls": {name: rounds * chunk for name in names},
        }
    )


if __name__ == "__main__":
    worker_main({"measure": _measure})
