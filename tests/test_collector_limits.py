"""What one peer can hold or cause in the collector is bounded (in process and a real daemon).

Partial frames have a deadline and a global byte budget; error logging is rate-limited; a
frame with an absurd counter delta is refused for that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.rawclient import RawClient

from qdash_mp import Client
from qdash_mp.collector import Collector
from qdash_mp.settings import CollectorSettings
from qdash_mp.wire import ErrorMsg

HEADER = struct.Struct(">I")


def partial(total: int, sent: int) -> bytes:
    """A frame header announcing ``total`` body bytes, and the first ``sent`` of them."""
    return HEADER.pack(total) + b"\x93" + b"\0" * (sent - 1)


@pytest.fixture
async def limited() -> AsyncIterator[Collector]:
    data_dir: Path = short_dir()
    c = Collector(
        CollectorSettings(
            data_dir=data_dir,
            http_enabled=False,
            frame_deadline=0.5,
            partial_frame_budget=1_000_000,
        )
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_partial_frame_deadline(limited: Collector) -> None:
    sock = str(limited.settings.socket)
    slow = await RawClient().connect(sock)
    slow.send_raw(partial(1000, 10))
    err = await slow.error(timeout=10)
    assert "did not complete within 0.5s" in err.reason
    assert await slow.next_message() is None  # closed
    await slow.close()
    assert limited.connections.partial_bytes == 0


async def test_partial_frames_share_one_budget(limited: Collector) -> None:
    sock = str(limited.settings.socket)
    big, mid, small = RawClient(), RawClient(), RawClient()
    for c in (big, mid, small):
        await c.connect(sock)
    big.send_raw(partial(10_000_000, 600_000))
    mid.send_raw(partial(10_000_000, 300_000))
    await asyncio.to_thread(
        wait_for, lambda: limited.connections.partial_bytes >= 900_000, 10, "partial frames"
    )
    small.send_raw(partial(10_000_000, 200_000))  # over the budget: the biggest holder goes
    err = await big.error()
    assert "byte budget" in err.reason
    assert await big.next_message() is None
    await asyncio.to_thread(
        wait_for, lambda: limited.connections.partial_bytes == 500_000, 10, "the eviction"
    )
    # The others keep their connections and finish their frames' worth of data later.
    assert await mid.nothing_within(0.1)
    assert await small.nothing_within(0.1)
    for c in (big, mid, small):
        await c.close()


async def test_error_logging_is_rate_limited(
    limited: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    sock = str(limited.settings.socket)
    caplog.set_level(logging.INFO, logger="qdash_mp.collector")
    for _ in range(200):
        c = await RawClient().connect(sock)
        c.send_raw(HEADER.pack(3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
        assert isinstance(await c.next_message(), ErrorMsg)
        await c.close()
    lines = [r for r in caplog.records if r.name == "qdash_mp.collector"]
    closing = [r for r in lines if "closing connection" in r.getMessage()]
    assert 1 <= len(closing) <= 3
    assert len(lines) <= 12  # connects/disconnects of one uid are throttled too


@pytest.mark.parametrize("queue_first", [True, False], ids=["queue-exists", "queue-fresh"])
async def test_huge_delta_refused_for_that_connection_only(
    limited: Collector, queue_first: bool
) -> None:
    """Hole 2 end to end: one client's 2**63-1 delta gets it ERROR; others stay exact.

    The wire refuses a delta over ``MAX_DELTA`` at decode; should a sum still not fit a
    slot, the collector refuses that batch on its own (tested with the queue already counted).
    """
    sock = str(limited.settings.socket)
    with Client(sock) as good:
        if queue_first:
            good.on_pushed("q")
            assert await asyncio.to_thread(good.flush, 10)
        bad = await RawClient().connect(sock)
        try:
            # Hand-made so no encoder check can stop it: [3, 1, {"q": [2**63-1, 0, 0, 0]}, []]
            big = (2**63 - 1).to_bytes(8, "big")
            body = b"\x94\x03\x01\x81\xa1q\x94\xcf" + big + b"\0\0\0\x90"
            bad.send_raw(HEADER.pack(len(body)) + body)
            err = await bad.error()
            assert err.code in ("protocol", "refused")
            assert await bad.next_message() is None
        finally:
            await bad.close()
        for _ in range(3):
            good.on_pushed("q")
        good.on_processed("q")
        assert await asyncio.to_thread(good.flush, 10)
    q = (await limited.inspector.stats()).queue("q")
    assert q is not None
    assert (q.pushed, q.processed) == (3 + queue_first, 1)


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_rss_returns_near_baseline_after_garbage() -> None:
    """100k garbage frames and 200 MiB of abandoned partial frames into a real daemon."""
    data_dir = short_dir()
    proc = CollectorProc(data_dir, args=("--no-http",)).start()
    try:
        assert proc.proc is not None
        pid = proc.proc.pid

        async def garbage(n_frames: int, partial_bytes: int) -> None:
            c = await RawClient().connect(proc.socket)
            try:
                if partial_bytes:  # abandoned halfway through a big frame
                    c.send_raw(partial(16_000_000, partial_bytes))
                    assert c.writer is not None
                    await c.writer.drain()
                else:
                    c.send_raw((HEADER.pack(3) + b"\xc1\xc1\xc1") * n_frames)
                    assert isinstance(await c.next_message(), ErrorMsg)
            finally:
                await c.close()

        async def wave(conns: int, n_frames: int, partial_bytes: int) -> None:
            for start in range(0, conns, 25):
                await asyncio.gather(
                    *(garbage(n_frames, partial_bytes) for _ in range(min(25, conns - start)))
                )

        await wave(100, 100, 0)  # warm up: the baseline includes what serving needs
        baseline = vm_rss(pid)
        await wave(1000, 100, 0)  # 100,000 garbage frames
        await wave(200, 0, 1_000_000)  # 200 MB of partial frames, abandoned
        # Without the heap trim (collector/heap.py) 3 runs in 10 stayed 10-30 MiB above.
        limit = baseline + 8 * 1024 * 1024
        await asyncio.to_thread(
            wait_for,
            lambda: vm_rss(pid) < limit,
            20,
            f"RSS back under {limit} (was {baseline}, is {vm_rss(pid)})",
        )
        with Client(proc.socket) as client:  # and it still serves
            client.on_pushed("q")
            assert await asyncio.to_thread(client.flush, 10)
    finally:
        proc.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_held_partial_frames_are_capped_in_a_real_daemon() -> None:
    """24 connections each holding most of a 15 MiB frame: the daemon keeps to its budget."""
    data_dir = short_dir()
    proc = CollectorProc(data_dir, args=("--no-http",)).start()
    held: list[RawClient] = []
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        baseline = vm_rss(pid)
        chunk = partial(15 * 1024 * 1024, 14 * 1024 * 1024)
        for _ in range(24):
            c = await RawClient().connect(proc.socket)
            held.append(c)
            c.send_raw(chunk)
            assert c.writer is not None
            # Evicted (or no longer read) while sending: what the budget is for.
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(c.writer.drain(), 10)
        peak = vm_rss(pid)
        # 24 x 14 MiB = 336 MiB unbounded; the default budget is 64 MiB.
        assert peak - baseline < 128 * 1024 * 1024, (baseline, peak)
        assert "byte budget" in proc.logs()
    finally:
        for c in held:
            await c.close()
        proc.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)
