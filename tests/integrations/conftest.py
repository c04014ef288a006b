"""Fixtures of the integrations suite: one redis-server and one collector per session.

Every test uses queue names of its own, so counters stay exact to the unit while the broker
and the collector are shared (starting them once keeps the suite inside its time budget).
Worker processes are real (``celery worker``, ``rq worker``, ``dramatiq``, ...); they find the
collector through ``$QDASH_SOCKET`` and the broker through ``$IT_REDIS_URL``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qdash_testing.collector import short_dir

from qdash_mp.testing import CollectorThread

from ._support import Env

_REDIS_START = 20.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integrations/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integrations)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free loopback port, without persistence."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    workdir = short_dir("qdredis")
    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + _REDIS_START
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def collector() -> Iterator[CollectorThread]:
    """The real collector (journal, shared memory, dashboard on a loopback port)."""
    with CollectorThread() as qc:
        yield qc


@pytest.fixture
def env(
    redis_url: str, collector: CollectorThread, tmp_path: Path, request: pytest.FixtureRequest
) -> Env:
    """Names, directories and environment for one test's worker and producer processes."""
    return Env.make(redis_url, collector, tmp_path, request.node.name)
