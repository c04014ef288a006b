"""The collector run in the test's own event loop: state that end-to-end tests cannot see."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qdash_testing.collector import short_dir

from qdash_mp import Client
from qdash_mp.collector import Collector
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
