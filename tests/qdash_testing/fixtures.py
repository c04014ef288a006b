"""Shared pytest fixtures; ``tests/conftest.py`` imports them, so every test module has them.

A module that defines a fixture of the same name keeps its own (pytest prefers the closer one).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qdash_mp import Client
from qdash_mp.collector import Collector
from qdash_mp.settings import CollectorSettings
from qdash_mp.testing import InProcessCollector
from qdash_testing.collector import CollectorProc, short_dir

__all__ = [
    "client_factory",
    "collector_proc",
    "collector_settings",
    "collector_settings_kw",
    "data_dir",
    "inprocess_collector",
    "live_collector",
    "running_collector",
]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh short directory under /tmp (room for a Unix socket path), removed afterwards."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def collector_proc(data_dir: Path) -> Iterator[CollectorProc]:
    """A collector process on ``data_dir``, *not* started: the test starts it when it wants."""
    proc = CollectorProc(data_dir)
    yield proc
    proc.cleanup()


@pytest.fixture
def running_collector(collector_proc: CollectorProc) -> CollectorProc:
    """A collector process on ``data_dir``, started (and cleaned up after the test)."""
    return collector_proc.start()


@pytest.fixture
def client_factory() -> Iterator[Callable[..., Client]]:
    """``make(socket_path, **kw)`` → a fast-flushing ``Client``, closed after the test."""
    made: list[Client] = []

    def make(socket_path: str, **kwargs: Any) -> Client:
        kwargs.setdefault("flush_interval", 0.02)
        kwargs.setdefault("reconnect_max", 0.1)
        client = Client(socket_path, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close(timeout=0.5)


@pytest.fixture
async def inprocess_collector() -> AsyncIterator[InProcessCollector]:
    """A real collector in the test's own loop, without HTTP (``qdash_mp.testing``)."""
    async with InProcessCollector(http=False) as qc:
        yield qc


@pytest.fixture
def collector_settings_kw() -> dict[str, Any]:
    """Extra ``CollectorSettings`` keywords for ``collector_settings``: none here; a test module
    overrides this fixture to add some (e.g. ``{"clock": clock}``)."""
    return {}


@pytest.fixture
def collector_settings(data_dir: Path, collector_settings_kw: dict[str, Any]) -> CollectorSettings:
    """Settings of a collector on ``data_dir``: the dashboard on a free port, ticks every 20 ms
    (so history and worker expiry show within a test)."""
    return CollectorSettings(
        data_dir=data_dir, http_port=0, tick_interval=0.02, **collector_settings_kw
    )


@pytest.fixture
async def live_collector(collector_settings: CollectorSettings) -> AsyncIterator[Collector]:
    """A ``Collector`` started on ``collector_settings`` in the test's own loop, with HTTP;
    stopped after the test (``data_dir`` removes its files)."""
    c = Collector(collector_settings)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
