"""``qdash_mp.testing``: the in-process collector users put in their own tests.

Real clients report to it from a worker thread and from a separate process; what they sent
must show up in ``stats()``, ``failed()``, the dashboard URL, and nothing may be left behind.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from qdash_testing.collector import run_worker
from qdash_testing.http import get_json, timeless

from qdash_mp import Client, Job
from qdash_mp.testing import CollectorThread, InProcessCollector

TIMEOUT = 60.0


def report(client: Client, n_failed: int = 2) -> None:
    """What a user's worker does: push, process, fail, through the hooks."""
    for _ in range(3):
        client.on_pushed("emails")
    client.on_processed("emails")
    for i in range(n_failed):
        job = Job(id=f"mail-{i}", name="SendWelcome", payload={"to": i}, attempts=1)
        client.on_failed("emails", job, RuntimeError(f"smtp down {i}"))


def leftovers(data_dir: Path, shm: str) -> list[str]:
    return [str(p) for p in (data_dir, *Path("/dev/shm").glob(shm + "*")) if p.exists()]


async def test_in_process_collector_with_a_client_in_a_worker_thread() -> None:
    async with InProcessCollector() as qc:
        assert len(qc.socket_path.encode()) < 100
        client = qc.client()
        await asyncio.to_thread(report, client)
        assert await qc.flushed(client)

        stats = await qc.stats()
        emails = stats.queue("emails")
        assert emails is not None
        assert (emails.pushed, emails.processed, emails.failed) == (3, 1, 2)
        assert [j.id for j in await qc.failed()] == ["mail-1", "mail-0"]
        record = await qc.failed_job("mail-0")
        assert record.job.payload == {"to": 0}
        assert "smtp down 0" in record.error

        api = await asyncio.to_thread(get_json, qc.url + "/queues/api/stats")
        assert timeless(api) == timeless(stats.to_dict())
        data_dir, shm = qc.collector.settings.data_dir, qc.collector.settings.shm
    assert leftovers(data_dir, shm) == []
    assert client.close(0.1)  # already closed by the collector's exit


async def test_in_process_collector_with_a_spawned_process() -> None:
    async with InProcessCollector(http=False) as qc:
        worker = run_worker(qc.socket_path, pushed=5, processed=4, failed=3, id_prefix="p")
        out, _ = await asyncio.to_thread(worker.communicate, timeout=TIMEOUT)
        assert worker.returncode == 0, out
        assert json.loads(out.strip().splitlines()[-1])["flushed"] is True
        q = (await qc.stats()).queue("q")
        assert q is not None
        assert (q.pushed, q.processed, q.failed) == (5, 4, 3)
        assert {j.id for j in await qc.failed()} == {"p-0", "p-1", "p-2"}


async def test_failed_lists_every_page(inprocess_collector: InProcessCollector) -> None:
    qc = inprocess_collector
    client = qc.client()
    await asyncio.to_thread(report, client, 120)  # more than two pages of 50
    assert await qc.flushed(client)
    ids = [j.id for j in await qc.failed()]
    assert ids == [f"mail-{i}" for i in reversed(range(120))]


async def test_requeue_function_serves_dashboard_retries() -> None:
    requeued: list[str] = []
    async with InProcessCollector(requeue=lambda job: requeued.append(job.id)) as qc:
        client = qc.client()
        await asyncio.to_thread(report, client, 1)
        assert await qc.flushed(client)
        await qc.collector.inspector.retry("mail-0")
        assert requeued == ["mail-0"]
        assert await qc.failed() == []


def test_fixture_with_a_client_in_a_worker_thread(qdash_collector: CollectorThread) -> None:
    client = qdash_collector.client()
    worker = threading.Thread(target=report, args=(client,))
    worker.start()
    worker.join(TIMEOUT)
    assert client.flush(TIMEOUT)
    emails = qdash_collector.stats().queue("emails")
    assert emails is not None
    assert (emails.pushed, emails.failed) == (3, 2)
    assert [j.id for j in qdash_collector.failed()] == ["mail-1", "mail-0"]
    assert get_json(qdash_collector.url + "/queues/api/failed")["total"] == 2


def test_fixture_with_a_spawned_process(qdash_collector: CollectorThread) -> None:
    worker = run_worker(qdash_collector.socket_path, pushed=2, failed=1, id_prefix="s")
    out, _ = worker.communicate(timeout=TIMEOUT)
    assert worker.returncode == 0, out
    q = qdash_collector.stats().queue("q")
    assert q is not None
    assert (q.pushed, q.failed) == (2, 1)
    assert qdash_collector.failed_job("s-0").job.id == "s-0"


def test_collector_thread_leaves_nothing_behind() -> None:
    before = set(threading.enumerate())
    with CollectorThread() as qc:
        client = qc.client()
        client.on_pushed("q")
        assert client.flush(TIMEOUT)
        data_dir = qc.inner.collector.settings.data_dir
        shm = qc.inner.collector.settings.shm
        assert leftovers(data_dir, shm) != []
    assert leftovers(data_dir, shm) == []
    assert set(threading.enumerate()) <= before
