"""Shared-memory stats test helpers: decode a block from the documented layout, independently.

``raw_*`` decode a block from the byte table in ``qdash_mp.shm.layout``'s docstring, without
its code, which also checks that documentation. Used by ``tests/test_shm*.py``.
"""

from __future__ import annotations

import glob
import os
import selectors
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import pytest

from qdash_mp.models import StatsView
from qdash_mp.stats import record_len

# --- the documented layout, decoded independently ---------------------------------------------

HEADER = struct.Struct("=8s15q")
"""magic, then version, R, C, N, seq, started, pid, generation, status, next, NAME_MAX,
redo-log count, incarnation, K and M."""
FIELDS = [
    "version",
    "ring",
    "capacity",
    "count",
    "seq",
    "started",
    "pid",
    "generation",
    "status",
    "next",
    "name_max",
    "log_count",
    "incarnation",
    "client_capacity",
    "clients",
]
HEADER_SIZE, ENTRY, CLIENT_ENTRY = 128, 256, 536


def attach_untracked(name: str) -> SharedMemory:
    """Attach like a reader should: without the resource tracker adopting the segment."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    shm = SharedMemory(name)
    resource_tracker.unregister("/" + name, "shared_memory")
    return shm


def attach_untracked_buf(name: str) -> bytes:
    shm = attach_untracked(name)
    try:
        return bytes(shm.buf[:HEADER_SIZE])
    finally:
        shm.close()


def raw_header(buf: Any) -> dict[str, Any]:
    magic, *slots = HEADER.unpack_from(buf)
    return {"magic": magic, **dict(zip(FIELDS, slots, strict=False))}


def raw_offsets(h: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(record slots L, then in bytes: records D, clients E, redo log G, log entry 8(W+2))."""
    rec = record_len(h["ring"])
    d = HEADER_SIZE + ENTRY * h["capacity"]
    e = d + 8 * rec * h["capacity"]
    g = e + CLIENT_ENTRY * h["client_capacity"]
    return rec, d, e, g, 8 * (max(rec, 67) + 2)


def raw_clients(buf: Any) -> dict[str, tuple[int, int]]:
    """client id -> (last seq, second), per the docstring."""
    h = raw_header(buf)
    _, _, e, _, _ = raw_offsets(h)
    out = {}
    for j in range(h["clients"]):
        at = e + CLIENT_ENTRY * j
        length, seq, sec = struct.unpack_from("=3q", buf, at)
        out[bytes(buf[at + 24 : at + 24 + length]).decode()] = (seq, sec)
    return out


def raw_rows(buf: Any) -> list[tuple[str, int, int]]:
    """(name, pushed, processed) of every queue, copying the records once, NO seqlock check."""
    h = raw_header(buf)
    rec, d, _, _, _ = raw_offsets(h)
    n = h["count"]
    records = bytes(buf[d : d + 8 * rec * n])
    rows = []
    for i in range(n):
        at = HEADER_SIZE + ENTRY * i
        (length,) = struct.unpack_from("=q", buf, at)
        name = bytes(buf[at + 8 : at + 8 + length]).decode("utf-8", "surrogatepass")
        pushed, processed = struct.unpack_from("=2q", records, 8 * rec * i)
        rows.append((name, pushed, processed))
    return rows


def write_slot(buf: Any, slot: int, value: int) -> None:
    struct.pack_into("=q", buf, 8 * slot, value)


# --- fixtures and helpers -------------------------------------------------------------------


class Clock:
    """An injectable clock (Unix seconds)."""

    def __init__(self, t: float = 1_700_000_000.25) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fresh_name() -> str:
    return f"qdash_t{os.getpid()}_{uuid.uuid4().hex[:10]}"


def remove_segments(name: str) -> None:
    for path in glob.glob(f"/dev/shm/{name}") + glob.glob(f"/dev/shm/{name}-g*"):
        os.unlink(path)


@pytest.fixture(name="name")
def name_fixture() -> Iterator[str]:
    """A unique table name; whatever segments a test leaves behind are removed.

    A test module registers it as ``name`` with ``from qdash_testing.shm import name_fixture``.
    """
    n = fresh_name()
    yield n
    remove_segments(n)


def segments(name: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/{name}*"))


def first_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The helper's first stdout line (it prints one when ready), within ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            pytest.fail(f"helper {proc.args} printed nothing in {timeout} s")
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"helper {proc.args} exited early: {err}")
    return line.strip()


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=60)
    return out, err


def rows(view: StatsView) -> dict[str, tuple[int, int, int, int]]:
    return {q.queue: (q.pushed, q.processed, q.failed, q.retried) for q in view.queues}
