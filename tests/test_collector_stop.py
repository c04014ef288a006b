"""Stopping a real collector process: a second signal, and a full disk at the snapshot."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.mounts import mounted_tmpfs
from qdash_testing.rawclient import RawClient

from qdash_mp import Client
from qdash_mp.journal import Journal
from qdash_mp.shm import SharedStatsReader


def stats_of(shm: str) -> tuple[int, int, int]:
    with SharedStatsReader(shm) as reader:
        q = reader.snapshot().queue("q")
    assert q is not None
    return q.pushed, q.processed, q.failed


def stats_of_or_none(shm: str) -> tuple[int, int, int] | None:
    with SharedStatsReader(shm) as reader:
        q = reader.snapshot().queue("q")
    return None if q is None else (q.pushed, q.processed, q.failed)


async def test_second_sigterm_does_not_cut_the_drain_short() -> None:
    data_dir = short_dir()
    proc = CollectorProc(data_dir).start()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw = await RawClient().connect(proc.socket)
        # A connection that never says HELLO keeps the drain waiting (bounded, 5 s), long
        # enough for a second signal to land in the middle of it.
        silent.connect(proc.socket)
        raw.send_batch(1, {"q": (40, 0, 40, 0)}, failed=40)  # not waiting for its ACK
        assert raw.writer is not None
        await raw.writer.drain()
        # Applied (the ACK may still be owed: its commit is what the drain waits for).
        await asyncio.to_thread(
            wait_for, lambda: stats_of_or_none(proc.shm) == (40, 0, 40), 30, "the batch"
        )
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(
            wait_for, lambda: "collector stopping" in proc.logs(), 30, "the stop to begin"
        )
        proc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.proc.wait, 30)
        assert code == 0, proc.logs()
        assert "already stopping" in proc.logs()
        assert await raw.ack() == 1  # the drain answered the batch ...
        shutdown = await raw.error()
        assert shutdown.code == "shutdown"  # ... before closing the connection
        await raw.close()
        journal = await asyncio.to_thread(Journal.open, data_dir / "journal")
        try:
            assert len(journal) == 40
            assert journal.client_seqs[raw.client_id] == 1
        finally:
            journal.close()
        assert (data_dir / "counters.snapshot").exists()  # a clean stop
    finally:
        silent.close()
        proc.cleanup()


@pytest.fixture
def small_fs() -> Iterator[Path]:
    with mounted_tmpfs("size=1m", "a 1 MiB tmpfs", lazy=True) as d:
        yield d


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1 << 20):  # bounded: 4 GiB, far beyond any tmpfs used here
            try:
                os.write(fd, chunk)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def test_full_disk_at_stop_keeps_the_counts(small_fs: Path) -> None:
    proc = CollectorProc(small_fs, args=("--no-http",)).start()
    try:
        with Client(proc.socket) as client:
            for _ in range(7):
                client.on_pushed("q")
            for _ in range(5):
                client.on_processed("q")
            assert client.flush(10)
        assert stats_of(proc.shm) == (7, 5, 0)
        filler = fill(small_fs)
        assert proc.proc is not None
        code = proc.stop()
        assert code != 0, proc.logs()
        assert "could not save the counters" in proc.logs()
        assert "kept the shared-memory segment" in proc.logs()
        assert Path("/dev/shm", proc.shm).exists()
        assert not (small_fs / "counters.snapshot").exists()
        filler.unlink()
        (small_fs / "collector.log").unlink()  # restart with room (the log is rewritten)
        proc = CollectorProc(small_fs, args=("--no-http",)).start()
        assert stats_of(proc.shm) == (7, 5, 0)
        assert proc.stop() == 0
        assert (small_fs / "counters.snapshot").exists()
    finally:
        proc.cleanup()


def test_sigterm_as_soon_as_it_is_ready_stops_it_cleanly() -> None:
    """``collector.json`` (what supervisors and tests wait for) is written during start: a
    SIGTERM sent the moment it appears must find the handlers installed — a clean stop, exit
    0, counters saved, no segment left — not the default action (exit -15, state left)."""
    data_dir = short_dir()
    proc = CollectorProc(data_dir, args=("--no-http",))
    try:
        for _ in range(5):
            proc.start()
            shm = proc.shm
            assert proc.stop() == 0, proc.logs()
            assert not Path("/dev/shm", shm).exists()
            assert (data_dir / "counters.snapshot").exists()
    finally:
        proc.cleanup()
