"""Helpers the journal tests share: an injected clock, failed jobs, opening and reading back.

Journals live in short temp dirs on tmpfs when there is one (``SHM``): the files are real,
fsync is cheap, so the every-offset and bit-flip loops stay fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from qdash_mp.journal import HEADER, Journal, RecordType
from qdash_mp.models import FailedJob, Job

__all__ = [
    "SHM",
    "jdir",
    "root",
    "T0",
    "Clock",
    "commit_ends",
    "fj",
    "ids_of",
    "open_j",
    "records",
    "segments",
    "state_of",
]

T0 = 1_700_000_000.0
SHM = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class Clock:
    """An injected clock: Unix seconds, moved by hand."""

    def __init__(self, now: float = T0 + 60) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fj(
    key: int | str, *, at: float = T0, error: str | None = None, payload: Any = None
) -> FailedJob:
    jid = key if isinstance(key, str) else f"job-{key}"
    return FailedJob(
        id=jid,
        queue="mail" if len(jid) % 2 else "default",
        job=Job(
            id=jid,
            name="tasks.work",
            payload={"n": jid, "blob": b"\x00\xff"} if payload is None else payload,
            attempts=2,
            enqueued_at=at - 5,
        ),
        error=error if error is not None else f"ValueError: boom {jid}",
        failed_at=datetime.fromtimestamp(at, UTC),
        traceback=f"Traceback (most recent call last):\n  {jid}\n",
    )


def open_j(path: Path, **kwargs: Any) -> Journal:
    kwargs.setdefault("clock", Clock())
    return Journal.open(path, **kwargs)


def ids_of(journal: Journal) -> list[str]:
    return [v.id for v in journal.page(0, len(journal) + 5)]


def state_of(journal: Journal) -> list[tuple[str, FailedJob]]:
    """Everything committed, newest first, read back in full."""
    return [(i, journal.get(i)) for i in ids_of(journal)]


def segments(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name.endswith(".seg"))


def commit_ends(data: bytes) -> list[int]:
    """End offsets of every COMMIT record in a segment's bytes."""
    ends = []
    pos = 0
    while pos + HEADER.size <= len(data):
        _crc, n, rtype = HEADER.unpack_from(data, pos)
        pos += HEADER.size + n
        if rtype == RecordType.COMMIT:
            ends.append(pos)
    return ends


def records(data: bytes) -> list[tuple[int, int, int]]:
    """``(offset, size, type)`` of every record in a segment's bytes."""
    out = []
    pos = 0
    while pos + HEADER.size <= len(data):
        _crc, n, rtype = HEADER.unpack_from(data, pos)
        out.append((pos, HEADER.size + n, rtype))
        pos += HEADER.size + n
    return out


@pytest.fixture
def root() -> Iterator[Path]:
    """A fresh short temp dir (on tmpfs when there is one), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="qj-", dir=SHM))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def jdir(root: Path) -> Path:
    """Where a test's journal lives (created by ``Journal.open``)."""
    return root / "journal"
