"""The collector run in the test's own event loop: state that end-to-end tests cannot see."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qdash_testing.collector import short_dir
from qdash_testing.rawclient import RawClient

from qdash_mp import Client
from qdash_mp.collector import Collector
from qdash_mp.journal import FileIO
from qdash_mp.settings import CollectorSettings


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    data_dir: Path = short_dir()
    c = Collector(CollectorSettings(data_dir=data_dir, http_enabled=False))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_many_viewers_share_one_snapshot(collector: Collector) -> None:
    first = await collector.inspector.stats()
    assert await collector.inspector.stats() is first  # nothing changed: no new snapshot
    with Client(str(collector.settings.socket)) as client:
        client.on_pushed("q")
        assert await asyncio.to_thread(client.flush, 10)
    after = await collector.inspector.stats()
    assert after is not first
    queue = after.queue("q")
    assert queue is not None
    assert queue.pushed == 1


async def test_stop_saves_counters_and_removes_runtime_files(collector: Collector) -> None:
    s = collector.settings
    assert s.state_file.exists()
    assert s.socket.exists()
    with Client(str(s.socket)) as client:
        client.on_processed("q")
        assert await asyncio.to_thread(client.flush, 10)
    await collector.stop()
    assert not s.state_file.exists()
    assert not s.socket.exists()
    assert s.counters_file.exists()
    again = Collector(s)
    await again.start()
    try:
        assert not s.counters_file.exists()  # restored, then removed
        view = await again.inspector.stats()
        assert view.totals.processed == 1
    finally:
        await again.stop()


# -- ACKs and the journal ----------------------------------------------------------------------


class HeldSync(FileIO):
    """The journal's file I/O with an fsync that waits while ``held`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.waiting = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if not self.release.is_set():
            self.waiting.set()
            self.release.wait(30)
        super().fdatasync(fd)


async def test_counter_only_acks_do_not_wait_on_a_journal_commit() -> None:
    data_dir = short_dir()
    io = HeldSync()
    c = Collector(CollectorSettings(data_dir=data_dir, http_enabled=False), journal_io=io)
    await c.start()
    sock = str(c.settings.socket)
    a, b = RawClient(), RawClient()
    try:
        await a.connect(sock)
        await b.connect(sock)
        io.release.clear()
        a.send_batch(1, {"q": (1, 0, 1, 0)}, failed=1)  # its ACK needs a commit: held up
        assert await asyncio.to_thread(io.waiting.wait, 10)
        b.send_batch(1, {"q": (5, 0, 0, 0)})  # counters only: acknowledged at once
        assert await b.ack() == 1
        b.send_batch(2, {"q": (0, 5, 0, 0)})
        assert await b.ack() == 2
        # A's next batch carries no failed jobs, but a cumulative ACK of it would cover the
        # uncommitted batch 1: it waits too.
        a.send_batch(2, {"q": (0, 1, 0, 0)})
        assert await a.nothing_within(0.3)
        io.release.set()
        acks = [await a.ack()]
        while acks[-1] < 2:
            acks.append(await a.ack())
        assert c.journal.client_seqs[a.client_id] == 1
        assert len(c.journal) == 1
    finally:
        io.release.set()
        await a.close()
        await b.close()
        await c.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_batches_stage_failed_jobs_once(collector: Collector) -> None:
    """The bulk staging path: FAILED arrays journaled as sent, and not again on a resend."""
    sock = str(collector.settings.socket)
    a = await RawClient().connect(sock)
    a.send_batch(1, {"q": (3, 0, 3, 0)}, failed=3)
    a.send_batch(2, {"q": (0, 0, 0, 0)})
    a.send_batch(3, {"q": (2, 0, 2, 0)}, failed=2)
    seqs = [await a.ack()]
    while seqs[-1] < 3:
        seqs.append(await a.ack())
    await a.close()
    journal = collector.journal
    assert len(journal) == 5
    assert journal.client_seqs[a.client_id] == 3
    job, raw = journal.get_raw(f"{a.client_id[:8]}-1-2")
    assert job.job.payload == {"i": 2}
    assert raw == b"\x81\xa1i\x02"  # the payload bytes exactly as packed by the client
    assert journal.failed_at(f"{a.client_id[:8]}-3-1") == a.base_time + 1
    # The client never saw the ACK (say): it reconnects and resends everything.
    again = await RawClient(a.client_id).connect(sock)
    assert again.welcome_seq == 3
    again.send_batch(1, {"q": (3, 0, 3, 0)}, failed=3)
    again.send_batch(3, {"q": (2, 0, 2, 0)}, failed=2)
    assert await again.ack() in (1, 3)
    await again.close()
    assert len(journal) == 5
    q = (await collector.inspector.stats()).queue("q")
    assert q is not None
    assert (q.pushed, q.failed) == (5, 5)


async def test_many_clients_stage_into_one_commit(collector: Collector) -> None:
    sock = str(collector.settings.socket)
    clients = [await RawClient().connect(sock) for _ in range(8)]
    commits = collector.live.group.commits
    for c in clients:
        c.send_batch(1, {"q": (10, 0, 10, 0)}, failed=10)
    assert [await c.ack() for c in clients] == [1] * 8
    for c in clients:
        await c.close()
    assert len(collector.journal) == 80
    assert collector.live.group.commits - commits <= 8
