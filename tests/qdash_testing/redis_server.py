"""A private ``redis-server`` for a test: free loopback port, stop/start on the same port.

``RedisServer(persistent=False)`` keeps nothing on disk (a restart comes back empty: Redis
"lost" the hub's state); ``persistent=True`` runs with an fsync-always append-only file, so a
restart keeps every key (an outage, not a loss). The ``redis_server`` fixture starts one and
tears it down (process and directory) after the test; the approach is the integrations
suite's session Redis (``tests/integrations/conftest.py``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qdash_testing.collector import short_dir

__all__ = ["RedisServer", "free_port", "module_redis", "r", "redis_server"]

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process (restartable on the same port and directory)."""

    def __init__(self, *, persistent: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.persistent = persistent
        self.dir: Path = short_dir("qdrds")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                *persistence,
                "--dir", str(self.dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (an append-only file is fsync'd on every write, so nothing is lost)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def client(self, **kwargs: Any) -> Any:
        """A synchronous redis-py client (``decode_responses`` off: the blobs are bytes)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, **kwargs)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started private redis-server without persistence, removed after the test."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """One private redis-server for a test module (tests flush it through ``r``)."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
async def r(module_redis: RedisServer) -> AsyncIterator[Any]:
    """An asyncio redis-py client of ``module_redis``, on an empty database before and after."""
    import redis.asyncio as aioredis  # the hub extra; only the hub tests use this fixture

    client = aioredis.from_url(module_redis.url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


# --------------------------------------------------------------------------- hub reading

WORKER = r"""
import json, sys, time
from qdash_mp import Client, Job
sock, queue, prefix, pushed, processed, failed = sys.argv[1:7]
c = Client(sock, flush_interval=0.02)
now = time.time()
for i in range(int(pushed)):
    c.on_pushed(queue)
for i in range(int(processed)):
    job = Job(id=f"{prefix}-p{i}", name="T", enqueued_at=now - 0.001 * (i % 50))
    c.on_started(queue, job)
    c.on_processed(queue, job, runtime=0.0001 * (1 + i % 300))
for i in range(int(failed)):
    job = Job(id=f"{prefix}-{i}", name="T", payload={"i": i, "by": prefix}, attempts=1)
    c.on_failed(queue, job, RuntimeError(f"boom {i}"), runtime=0.002)
print(json.dumps({"flushed": c.flush(timeout=60)}), flush=True)
c.close()
"""


def run_worker(
    socket_path: str, queue: str, prefix: str, *, pushed: int, processed: int, failed: int
) -> None:
    """A real client process: hook calls with runtimes and wait times, flushed, exited."""
    import json
    import sys

    counts = (pushed, processed, failed)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, socket_path, queue, prefix, *map(str, counts)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {"flushed": True}, out


def hub_host(r: Any, host: str, prefix: str = "qdash:") -> dict[str, Any]:
    """Everything the hub holds for ``host``, decoded (strictly) with qdash_mp.hub.format."""
    from qdash_mp.hub.format import decode_host, decode_queue, decode_workers
    from qdash_mp.hub.format_failed import decode_failed
    from qdash_mp.hub.keys import Keys

    k = Keys(prefix)
    info = r.hget(k.hosts, host)
    workers = r.get(k.w(host))
    return {
        "seq": int(r.hget(k.seq, host) or 0),
        "info": decode_host(info) if info else None,
        "queues": {q.decode(): decode_queue(v) for q, v in r.hgetall(k.q(host)).items()},
        "workers": decode_workers(workers) if workers is not None else None,
        "fi": {m.decode(): s for m, s in r.zrange(k.fi(host), 0, -1, withscores=True)},
        "fj": {i.decode(): decode_failed(v) for i, v in r.hgetall(k.fj(host)).items()},
        "fall": {
            m.decode(): s
            for m, s in r.zrange(k.fall, 0, -1, withscores=True)
            if m.startswith(host.encode() + b"\x00")
        },
    }


def host_view(http: str) -> dict[str, Any]:
    """A host dashboard's stats rows by queue and its failed job ids -> failed_at."""
    from datetime import datetime

    from qdash_testing.http import get_json

    stats = get_json(http + "/queues/api/stats")
    failed: dict[str, float] = {}
    page = 1
    while True:
        doc = get_json(f"{http}/queues/api/failed?page={page}")
        rows = doc["jobs"] if isinstance(doc, dict) else doc
        for row in rows:
            failed[row["id"]] = datetime.fromisoformat(row["failed_at"]).timestamp()
        if len(rows) < 50:
            break
        page += 1
    return {"queues": {q["queue"]: q for q in stats["queues"]}, "failed": failed}


def mismatch(r: Any, host: str, http: str) -> str:
    """What differs between the hub's copy of ``host`` and its own dashboard ('' = none).

    Compared to the unit: every counter of every queue, the runtime/wait counts (the sum of
    the hub's buckets), and the failed ids (index, records and the all-hosts index)."""
    hub = hub_host(r, host)
    own = host_view(http)
    diffs = []
    if set(hub["queues"]) != set(own["queues"]):
        diffs.append(f"queues {sorted(hub['queues'])} != {sorted(own['queues'])}")
    for name, row in own["queues"].items():
        rec = hub["queues"].get(name)
        if rec is None:
            continue
        got = {
            "pushed": rec.pushed,
            "processed": rec.processed,
            "failed": rec.failed,
            "retried": rec.retried,
            "active": rec.active,
            "runtime": sum(rec.runtime.values()),
            "wait": sum(rec.wait.values()),
        }
        want = {k: row[k] for k in ("pushed", "processed", "failed", "retried", "active")}
        want |= {"runtime": row["runtime"]["count"], "wait": row["wait"]["count"]}
        if got != want:
            diffs.append(f"queue {name}: hub {got} != host {want}")
    if set(hub["fi"]) != set(own["failed"]):
        extra = sorted(set(hub["fi"]) - set(own["failed"]))[:5]
        missing = sorted(set(own["failed"]) - set(hub["fi"]))[:5]
        diffs.append(f"failed ids: hub extra {extra}, missing {missing}")
    if set(hub["fj"]) != set(hub["fi"]) or {f"{host}\x00{i}" for i in hub["fi"]} != set(
        hub["fall"]
    ):
        diffs.append("fi / fj / fall disagree")
    return "; ".join(diffs)


def requeue_then_pause(job: Any) -> None:
    """A ``--requeue`` target: appends the job id to ``$QDASH_TEST_REQUEUE_FILE``; for an id
    containing ``"pause"`` it then pauses the writes of the Redis on
    ``$QDASH_TEST_REDIS_PORT`` for 30 s, so the publish that would acknowledge the retry
    hangs there (a test kills the collector in that window)."""
    import os

    with open(os.environ["QDASH_TEST_REQUEUE_FILE"], "a") as f:
        f.write(job.id + "\n")
    if "pause" in job.id:
        port = int(os.environ["QDASH_TEST_REDIS_PORT"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"CLIENT PAUSE 30000 WRITE\r\n")
            assert conn.recv(16).startswith(b"+OK")
