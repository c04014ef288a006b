"""A real collector inside your own tests, the way dramatiq's ``StubBroker`` stands in a broker.

Nothing is faked: it is the daemon's own ``Collector`` (Unix socket, shared-memory counters,
fsync'd journal, dashboard on an ephemeral loopback port) on a fresh temporary directory with a
short socket path, taken down and removed afterwards. Your code talks to it through an ordinary
``Client``; your test reads what arrived.

In an async test (pytest-aiohttp, pytest-asyncio, ...) run it in the test's own loop. Hook
calls and ``Client.flush()`` block, so call them from a thread (or another process), never
on the loop the collector runs on::

    from qdash_mp.testing import InProcessCollector

    async def test_failures_are_reported() -> None:
        async with InProcessCollector() as qc:
            client = qc.client()
            await asyncio.to_thread(my_worker.run, client)    # calls client.on_failed(...)
            assert await qc.flushed(client)
            assert (await qc.stats()).queue("emails").failed == 1
            assert [j.id for j in await qc.failed()] == ["job-1"]

In any test, sync or async, without an async plugin: the ``qdash_collector`` fixture runs the
same collector on its own loop in a background thread and answers synchronously. Import it
into a ``conftest.py`` to register it::

    # conftest.py
    from qdash_mp.testing import qdash_collector  # noqa: F401

    # test_worker.py
    def test_pushes_are_counted(qdash_collector: CollectorThread) -> None:
        client = qdash_collector.client()       # closed for you at the end of the test
        client.on_pushed("emails")
        assert client.flush(5)
        assert qdash_collector.stats().queue("emails").pushed == 1

Both give ``socket_path`` (pass it to your own ``Client``s or worker processes), ``url`` (the
dashboard's ``http://127.0.0.1:PORT``; ``/queues/`` and ``/queues/api/stats`` below it),
``stats()`` (a ``StatsView``), ``failed()`` (every failed job, newest first, as ``JobView``),
``failed_job(id)`` (the full ``FailedJob``) and ``client(**kw)`` (a ``Client`` bound to it).
Only the fixture needs pytest; the classes work under any test runner.
``requeue=`` sets the collector's own requeue function (what a dashboard retry calls when no
connected client registered one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qdash_mp.client import Client
from qdash_mp.collector import Collector
from qdash_mp.models import FailedJob, Job, JobView, StatsView
from qdash_mp.settings import CollectorSettings

__all__ = ["CollectorThread", "InProcessCollector", "qdash_collector"]

T = TypeVar("T")

_START_TIMEOUT = 30.0
_CLIENT_CLOSE_TIMEOUT = 2.0


class InProcessCollector:
    """A ``Collector`` in the running event loop, on a temporary data dir; ``async with`` it.

    ``http=False`` skips the dashboard (``url`` then raises). Extra keywords go to
    ``CollectorSettings`` (e.g. ``max_failed_jobs=10``).
    """

    def __init__(
        self, *, requeue: Callable[[Job], object] | None = None, http: bool = True, **settings: Any
    ) -> None:
        self._requeue = requeue
        self._http = http
        self._settings_kw = settings
        self._data_dir: Path | None = None
        self._collector: Collector | None = None
        self._clients: list[Client] = []

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the collector (``async with`` does this)."""
        # /tmp, not $TMPDIR: a Unix socket path must stay under ~107 bytes.
        self._data_dir = Path(tempfile.mkdtemp(prefix="qdash-", dir="/tmp"))
        settings = CollectorSettings(
            data_dir=self._data_dir,
            http_enabled=self._http,
            http_host="127.0.0.1",
            http_port=0,
            **self._settings_kw,
        )
        collector = Collector(settings, requeue=self._requeue)
        try:
            await collector.start()
        except BaseException:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            raise
        self._collector = collector

    async def stop(self) -> None:
        """Close the clients made by ``client()``, stop the collector, remove its files."""
        clients, self._clients = self._clients, []
        for client in clients:
            await asyncio.to_thread(client.close, _CLIENT_CLOSE_TIMEOUT)
        collector, self._collector = self._collector, None
        try:
            if collector is not None:
                await collector.stop()
        finally:
            if self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)

    async def __aenter__(self) -> InProcessCollector:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what tests use ----------------------------------------------------------------------

    @property
    def collector(self) -> Collector:
        """The running ``Collector`` itself."""
        if self._collector is None:
            raise RuntimeError("the collector is not running (use `async with`)")
        return self._collector

    @property
    def socket_path(self) -> str:
        """The Unix socket ``Client``s connect to."""
        return str(self.collector.settings.socket)

    @property
    def url(self) -> str:
        """The dashboard's root, ``http://127.0.0.1:PORT`` (the pages are under ``/queues/``)."""
        url = self.collector.http_url
        if url is None:
            raise RuntimeError("this collector was started with http=False")
        return url

    def client(self, **kwargs: Any) -> Client:
        """A ``Client`` connected to this collector (closed on exit); kwargs go to ``Client``.

        Its hooks and ``flush()`` block: use them from another thread, or ``await flushed()``.
        """
        kwargs.setdefault("flush_interval", 0.02)
        kwargs.setdefault("reconnect_max", 0.2)
        client = Client(self.socket_path, **kwargs)
        self._clients.append(client)
        return client

    async def flushed(self, client: Client, timeout: float = 10.0) -> bool:
        """``client.flush(timeout)`` without blocking this loop (the collector runs on it)."""
        return await asyncio.to_thread(client.flush, timeout)

    async def stats(self) -> StatsView:
        """The counters now, as the dashboard's ``/api/stats`` shows them."""
        return await self.collector.inspector.stats()

    async def failed(self) -> list[JobView]:
        """Every failed job the collector holds, newest first."""
        inspector = self.collector.inspector
        out: list[JobView] = []
        total = await inspector.failed_count()
        page = 1
        while len(out) < total:  # bounded: each page is non-empty until the end
            rows = await inspector.failed(page)
            if not rows:
                break
            out.extend(rows)
            page += 1
        return out

    async def failed_job(self, id: str) -> FailedJob:
        """The full record of failed job ``id`` (``NotFound`` if unknown)."""
        return await self.collector.inspector.failed_job(id)


class CollectorThread:
    """An ``InProcessCollector`` on its own event loop in a daemon thread, answering synchronously.

    ``with CollectorThread() as qc:`` (or the ``qdash_collector`` fixture). Same keywords and
    members as ``InProcessCollector``, with ``stats()``, ``failed()`` and ``failed_job()``
    plain calls; ``qc.inner`` is the ``InProcessCollector``.
    """

    def __init__(
        self, *, requeue: Callable[[Job], object] | None = None, http: bool = True, **settings: Any
    ) -> None:
        self.inner = InProcessCollector(requeue=requeue, http=http, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = _START_TIMEOUT) -> T:
        assert self._loop is not None, "the collector thread is not running"
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def start(self) -> None:
        """Start the loop thread and the collector on it."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="qdash_mp.testing.collector", daemon=True
        )
        self._thread.start()
        try:
            self._call(self.inner.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        """Stop the collector, then the loop and its thread."""
        if self._loop is None:
            return
        try:
            self._call(self.inner.stop())
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_START_TIMEOUT)
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    def __enter__(self) -> CollectorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def socket_path(self) -> str:
        return self.inner.socket_path

    @property
    def url(self) -> str:
        return self.inner.url

    def client(self, **kwargs: Any) -> Client:
        """A ``Client`` connected to this collector (closed at stop); kwargs go to ``Client``."""
        return self.inner.client(**kwargs)

    def stats(self) -> StatsView:
        return self._call(self.inner.stats())

    def failed(self) -> list[JobView]:
        return self._call(self.inner.failed())

    def failed_job(self, id: str) -> FailedJob:
        return self._call(self.inner.failed_job(id))


def _qdash_collector() -> Iterator[CollectorThread]:
    """A running ``CollectorThread`` for one test; stopped and removed afterwards."""
    with CollectorThread() as qc:
        yield qc


try:
    import pytest
except ImportError:  # InProcessCollector and CollectorThread need no pytest; the fixture does
    pass
else:
    qdash_collector = pytest.fixture(name="qdash_collector")(_qdash_collector)
