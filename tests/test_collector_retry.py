"""Retries in a real collector (in this test's loop) over real HTTP: exactly once, counts add up.

Also the embedded ``MemoryFailedJobs`` holding the same rules.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from qdash_testing.collector import short_dir

from qdash_mp import Client
from qdash_mp.collector import Collector
from qdash_mp.errors import NotFound, RetryConflict
from qdash_mp.failed import MemoryFailedJobs
from qdash_mp.models import FailedJob, Job
from qdash_mp.settings import CollectorSettings
from qdash_mp.stats import Stats

PAIRS = 1000


class CountingRequeue:
    """An async ``requeue`` that counts every job it is handed (and can be held up)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.attempts: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, job: Job) -> None:
        self.calls[job.id] += 1
        self.attempts[job.id] = job.attempts
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(3):  # a few loop passes: the window a second retry would slip into
            await asyncio.sleep(0)


def failed_job(id: str, queue: str = "q", attempts: int = 2, at: float | None = None) -> FailedJob:
    return FailedJob(
        id=id,
        queue=queue,
        job=Job(id=id, name="task", payload={"n": 1}, attempts=attempts, enqueued_at=1.0),
        error="boom",
        failed_at=datetime.fromtimestamp(at if at is not None else 1_700_000_000.0, UTC),
        traceback="",
    )


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, CountingRequeue]]:
    data_dir: Path = short_dir()
    requeue = CountingRequeue()
    c = Collector(CollectorSettings(data_dir=data_dir, http_port=0), requeue=requeue)
    await c.start()
    try:
        yield c, requeue
    finally:
        await c.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def stage(c: Collector, jobs: list[FailedJob]) -> None:
    for f in jobs:
        c.journal.stage_failed(f)
    await c.live.group.commit()


async def http_session(c: Collector) -> tuple[aiohttp.ClientSession, str]:
    assert c.http_url is not None
    session = aiohttp.ClientSession(
        base_url=c.http_url,
        connector=aiohttp.TCPConnector(limit=200),
        cookie_jar=aiohttp.CookieJar(unsafe=True),  # the dashboard is on an IP address
    )
    async with session.get("/queues/failed") as resp:
        page = await resp.text()
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None
    return session, match.group(1)


async def test_concurrent_http_retries_requeue_exactly_once(
    collector: tuple[Collector, CountingRequeue],
) -> None:
    c, requeue = collector
    ids = [f"job-{i}" for i in range(PAIRS)]
    await stage(c, [failed_job(i) for i in ids])
    session, token = await http_session(c)
    headers = {"Accept": "application/json", "Origin": c.http_url or ""}

    async def post(id: str) -> int:
        async with session.post(
            f"/queues/failed/{id}/retry", data={"csrf_token": token}, headers=headers
        ) as resp:
            await resp.read()
            return resp.status

    async with session:
        statuses = await asyncio.gather(*(post(id) for id in ids for _ in range(2)))
    by_id: dict[str, list[int]] = {}
    for id, status in zip([id for id in ids for _ in range(2)], statuses, strict=True):
        by_id.setdefault(id, []).append(status)
    for id, pair in by_id.items():
        assert sorted(pair) in ([200, 404], [200, 409]), (id, pair)
    successes = sum(1 for s in statuses if s == 200)
    assert successes == PAIRS
    assert sum(requeue.calls.values()) == successes
    assert set(requeue.calls) == set(ids)
    assert set(requeue.attempts.values()) == {3}  # attempts + 1
    assert len(c.journal) == 0
    view = await c.inspector.stats()
    q = view.queue("q")
    assert q is not None
    assert q.retried == PAIRS
    assert q.pushed == PAIRS


async def test_newer_failure_during_retry_is_kept(
    collector: tuple[Collector, CountingRequeue],
) -> None:
    c, requeue = collector
    await stage(c, [failed_job("j", at=1_700_000_000.0)])
    requeue.gate = asyncio.Event()
    retry = asyncio.create_task(c.retry("j"))
    await requeue.entered.wait()
    # The job failed again (and that failure committed) while it was being re-enqueued.
    await stage(c, [failed_job("j", at=1_700_000_100.0)])
    with pytest.raises(RetryConflict, match="retry in progress"):
        await c.retry("j")
    requeue.gate.set()
    await retry
    assert requeue.calls["j"] == 1
    assert len(c.journal) == 1
    assert c.journal.failed_at("j") == 1_700_000_100.0  # the newer record stayed
    # ... and it can be retried on its own now.
    await c.retry("j")
    assert requeue.calls["j"] == 2
    assert len(c.journal) == 0
    with pytest.raises(NotFound):
        await c.retry("j")


async def test_forget_during_retry(collector: tuple[Collector, CountingRequeue]) -> None:
    c, requeue = collector
    await stage(c, [failed_job("f")])
    requeue.gate = asyncio.Event()
    retry = asyncio.create_task(c.retry("f"))
    await requeue.entered.wait()
    await c.forget("f")
    requeue.gate.set()
    await retry  # the job was re-enqueued: the retry succeeded, nothing left to drop
    assert requeue.calls["f"] == 1
    assert len(c.journal) == 0
    with pytest.raises(NotFound):
        await c.retry("f")
    view = await c.inspector.stats()
    q = view.queue("q")
    assert q is not None
    assert q.retried == 1


async def test_retry_counts_add_up_with_a_worker(
    collector: tuple[Collector, CountingRequeue],
) -> None:
    """A worker pushes 3 jobs, 1 fails; the dashboard retries it; it then succeeds."""
    c, requeue = collector
    with Client(str(c.settings.socket)) as client:
        for i in range(3):
            client.on_pushed("q", Job(id=f"w{i}", name="t"))
        client.on_processed("q", Job(id="w0", name="t"))
        client.on_processed("q", Job(id="w1", name="t"))
        client.on_failed("q", Job(id="w2", name="t", attempts=1), "boom")
        assert await asyncio.to_thread(client.flush, 10)
        await c.retry("w2")
        assert requeue.attempts["w2"] == 2
        q = (await c.inspector.stats()).queue("q")
        assert q is not None
        assert (q.pushed, q.processed, q.failed, q.retried, q.pending) == (4, 2, 1, 1, 1)
        assert q.pushed == q.processed + q.failed + q.pending
        client.on_processed("q", Job(id="w2", name="t", attempts=2))  # the retried run
        assert await asyncio.to_thread(client.flush, 10)
    q = (await c.inspector.stats()).queue("q")
    assert q is not None
    assert (q.pushed, q.processed, q.failed, q.pending) == (4, 3, 1, 0)
    assert q.pushed == q.processed + q.failed + q.pending


# -- embedded --------------------------------------------------------------------------------


def test_memory_retry_exactly_once_under_threads() -> None:
    entered = threading.Barrier(2)
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def requeue(job: Job) -> None:
        with lock:
            calls[job.id] += 1

    failed = MemoryFailedJobs(requeue)
    ids = [f"m{i}" for i in range(300)]
    for id in ids:
        failed.record(Job(id=id, name="t"), "q", "boom")
    outcomes: Counter[str] = Counter()

    def retry_all() -> None:
        entered.wait()
        for id in ids:
            try:
                failed.retry(id)
            except RetryConflict:
                outcome = "conflict"
            except NotFound:
                outcome = "notfound"
            else:
                outcome = "ok"
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=retry_all) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes["ok"] == len(ids)
    assert outcomes["ok"] + outcomes["conflict"] + outcomes["notfound"] == 2 * len(ids)
    assert all(n == 1 for n in calls.values())
    assert len(calls) == len(ids)
    assert len(failed) == 0


def test_memory_retry_counts_add_up_and_bumps_attempts() -> None:
    stats = Stats()
    seen: list[Job] = []
    failed = MemoryFailedJobs(seen.append).with_stats(stats)
    for _i in range(3):
        stats.on_pushed("q")
    stats.on_processed("q")
    stats.on_processed("q")
    stats.on_failed("q")
    failed.record(Job(id="x", name="t", attempts=1), "q", "boom")
    failed.retry("x")
    assert [j.attempts for j in seen] == [2]
    q = stats.snapshot().queue("q")
    assert q is not None
    assert (q.pushed, q.processed, q.failed, q.retried, q.pending) == (4, 2, 1, 1, 1)
    stats.on_processed("q")
    q = stats.snapshot().queue("q")
    assert q is not None
    assert q.pushed == q.processed + q.failed + q.pending
    assert q.pending == 0


def test_memory_forget_during_retry_keeps_newer_and_requeues_once() -> None:
    failed: MemoryFailedJobs
    calls: list[str] = []

    def requeue(job: Job) -> None:
        calls.append(job.id)
        # While being re-enqueued the job fails again; a second retry meanwhile conflicts.
        failed.record(Job(id=job.id, name="t"), "q", "again")
        with pytest.raises(RetryConflict):
            failed.retry(job.id)

    failed = MemoryFailedJobs(requeue)
    failed.record(Job(id="y", name="t"), "q", "boom")
    failed.retry("y")
    assert calls == ["y"]
    assert failed.get("y").error == "again"  # the newer record stayed
