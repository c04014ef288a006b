"""The collector's life cycle: start, stop, signals, the data-dir lock and the state file.

``await Collector(settings).start()`` checks what can be checked up front (socket path
length), takes the data-dir lock, replaces a stale socket (or refuses to start next to a live
collector), opens the journal and the stats, listens, and writes ``<data-dir>/collector.json``.
A start that fails removes what it created (socket, lock file, a shared-memory segment it
made, an empty journal directory) and raises ``CollectorError`` with one line that says what
to do. ``await stop()`` stops accepting, answers what is in flight, commits the journal, saves
a counters snapshot and only then removes the shared-memory segment: if the snapshot cannot
be written the segment is kept (the next start reattaches to it) and ``stop`` raises
``SnapshotNotSaved``. ``serve``/``run`` do both around SIGTERM/SIGINT; a second signal while
stopping is logged ("already stopping") and does not cut the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from qdash_mp.collector.connections import Connections
from qdash_mp.collector.inspector import CollectorInspector
from qdash_mp.collector.lifecycle import Lifecycle
from qdash_mp.collector.retry import RequeueFn, Retries, load_requeue
from qdash_mp.errors import CollectorError, JournalError, QdashError, SnapshotNotSaved
from qdash_mp.fsio import try_flock, write_atomically
from qdash_mp.journal import FileIO, GroupCommit, Journal
from qdash_mp.settings import MAX_SOCKET_PATH, CollectorSettings
from qdash_mp.shm import SharedStats
from qdash_mp.web.collector_app import collector_app
from qdash_mp.wire import PROTOCOL_VERSION

if TYPE_CHECKING:
    from qdash_mp.hub.publisher import Publisher

__all__ = ["Collector", "run", "serve"]

log = logging.getLogger("qdash_mp.collector")

LOCK_NAME = "collector.lock"
CANCEL_WAIT = 2.0
CANCEL_ROUNDS = 3
"""A background task gets this many cancellations, this many seconds apart, to stop."""

SHM_DIR = Path("/dev/shm")  # noqa: S108 - where Linux keeps POSIX shared memory


@dataclass(frozen=True, slots=True)
class Live:
    """What a started collector has open."""

    stats: SharedStats
    journal: Journal
    group: GroupCommit


class Collector:
    """The daemon's state and servers; see the module docstring for the life cycle.

    ``journal_io`` is the journal's file-I/O seam (tests slow or fail its fsync).
    """

    def __init__(
        self,
        settings: CollectorSettings,
        *,
        requeue: RequeueFn | None = None,
        journal_io: FileIO | None = None,
    ) -> None:
        self.settings = settings
        if requeue is None and settings.requeue:
            requeue = load_requeue(settings.requeue)
        self._journal_io = journal_io
        self._live: Live | None = None
        self._runner: web.AppRunner | None = None
        self._lock_fd: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()
        self.http_url: str | None = None
        self.stats_version = 0
        """Bumped whenever this collector changes the counters (views can be cached by it)."""
        self.lifecycle = Lifecycle(settings)
        self.connections = Connections(self)
        self.retries = Retries(self, requeue)
        self.inspector = CollectorInspector(self)
        self.hub: Publisher | None = None
        """The Redis hub publisher (``--hub``), made at start."""

    @property
    def stopping(self) -> bool:
        """True once ``stop`` has begun."""
        return self._stopping

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Open everything and start serving; ``CollectorError`` (one line) if not possible."""
        s = self.settings
        _check_socket_path(s.socket)
        created: list[Path] = []  # what this start made, removed again if it fails
        shm_created = False
        try:
            _make_dir(s.data_dir, created)
            self._take_lock(created)
            self._clear_stale_socket()
            journal_dir = s.data_dir / "journal"
            if not journal_dir.exists():
                created.append(journal_dir)
            journal = await asyncio.to_thread(
                Journal.open,
                journal_dir,
                salvage=s.salvage,
                max_jobs=s.max_failed_jobs,
                max_age=s.max_failed_age,
                io=self._journal_io,
            )
            try:
                shm_created = not (SHM_DIR / s.shm).exists()
                stats = SharedStats.create_or_attach(s.shm, restore_from=s.counters_file)
            except BaseException:
                journal.close()
                raise
            self._live = Live(stats, journal, GroupCommit(journal))
            self._attach_hub(journal)
            if not self.lifecycle.history_dir.exists():
                created.append(self.lifecycle.history_dir)
            await self.lifecycle.open(stats)
            await self.connections.listen()
            created.append(s.socket)
            if s.http_enabled:
                await self._serve_http()
            self._write_state()
            # Only now, with the segment serving: the snapshot has been restored (or is stale
            # next to a segment that survived a crash); left behind it could roll counters
            # back. A start that failed keeps it, so the counts are not lost with the segment.
            s.counters_file.unlink(missing_ok=True)
            self._spawn(self._maintenance(), "qdash_mp.maintenance")
            self._spawn(self.lifecycle.run(stats, lambda: self.stats_version), "qdash_mp.tick")
            if self.hub is not None:
                self._spawn(self.hub.run(), "qdash_mp.hub")
        except BaseException as exc:
            await self._close_resources(clean=False, unlink_shm=shm_created)
            _remove_created(created, s)
            if isinstance(exc, OSError):
                raise CollectorError(_describe_os_error(exc, s)) from exc
            raise
        log.info(
            "collector ready: socket %s, dashboard %s, shared memory %s, %d failed jobs",
            s.socket,
            self.http_url or "(off)",
            s.shm,
            len(self.live.journal),
        )

    def _attach_hub(self, journal: Journal) -> None:
        """With ``--hub``: the publisher, listening to the journal before anything commits."""
        s = self.settings
        if not s.hub_url:
            return
        try:
            from qdash_mp.hub.publisher import Publisher
        except ImportError as exc:
            raise CollectorError(
                f"--hub needs redis-py: pip install 'qdash_mp[hub]' ({exc})"
            ) from exc
        from qdash_mp.hub.keys import check_host

        host = check_host(s.hub_host or socket.gethostname())
        self.hub = Publisher(self, s.hub_url, host, interval=s.hub_interval)
        journal.on_applied = self.hub.on_applied

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _maintenance(self) -> None:
        """Now and then: expire old failed jobs and compact the journal (off the loop)."""
        while True:
            await asyncio.sleep(self.settings.maintenance_interval)
            live = self.live
            try:
                if live.journal.enforce_retention():
                    await live.group.commit()
                if await asyncio.to_thread(live.journal.maybe_compact):
                    log.info(
                        "journal compacted: %d live bytes in %d bytes",
                        live.journal.live_bytes,
                        live.journal.total_bytes,
                    )
            except JournalError as exc:
                log.error("journal maintenance failed (will try again): %s", exc)

    @property
    def live(self) -> Live:
        """The open stats and journal; ``CollectorError`` before ``start``/after ``stop``."""
        if self._live is None:
            raise CollectorError("the collector is not running")
        return self._live

    @property
    def stats(self) -> SharedStats:
        """The shared-memory counters this collector writes."""
        return self.live.stats

    @property
    def journal(self) -> Journal:
        """The failed-job journal."""
        return self.live.journal

    async def retry(self, id: str) -> None:
        """Requeue failed job ``id`` exactly once (see ``qdash_mp.collector.retry``)."""
        await self.retries.retry(id)

    async def forget(self, id: str) -> None:
        """Drop failed job ``id`` (durably); ``NotFound`` if unknown."""
        await self.retries.forget(id)

    async def flush_failed(self) -> int:
        """Drop every failed job (durably); returns how many there were."""
        return await self.retries.flush_failed()

    def _take_lock(self, created: list[Path]) -> None:
        path = self.settings.data_dir / LOCK_NAME
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not try_flock(fd):
            os.close(fd)
            raise CollectorError(
                f"another collector is using {self.settings.data_dir} "
                f"(see {self.settings.state_file}); stop it first or pass another --data-dir"
            ) from None
        self._lock_fd = fd
        if not existed:
            created.append(path)

    def _clear_stale_socket(self) -> None:
        path = self.settings.socket
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise CollectorError(f"{path} exists and is not a socket; remove it or pass --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s left by a collector that is gone", path)
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise CollectorError(f"cannot probe existing socket {path}: {exc}") from exc
        finally:
            probe.close()
        raise CollectorError(
            f"a collector is already listening on {path}; stop it first or pass another --socket"
        )

    async def _serve_http(self) -> None:
        app = collector_app(self)

        async def root(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(str(request.app.router["qdash.overview"].url_for()))

        app.router.add_get("/", root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = self.settings.http_host, self.settings.http_port
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise CollectorError(
                f"cannot serve the dashboard on {host}:{port}: {why}; "
                "pass another --http HOST:PORT (port 0 picks a free one) or --no-http"
            ) from exc
        host, port = self._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.http_url = f"http://{shown}:{port}"

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "socket": str(self.settings.socket.resolve()),
            "http": self.http_url,
            "dashboard": f"{self.http_url}/queues/" if self.http_url else None,
            "shm": self.stats.name,
            "data_dir": str(self.settings.data_dir.resolve()),
            "protocol": PROTOCOL_VERSION,
            "started_at": time.time(),
        }
        write_atomically(self.settings.state_file, (json.dumps(state, indent=2) + "\n").encode())

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Stop accepting, answer what is in flight, make it durable, remove runtime files.

        ``SnapshotNotSaved`` if the counters snapshot could not be written: the segment is
        then kept for the next start, which reattaches to it.
        """
        if self._stopping:
            if not self._stopped.is_set():
                log.info("collector already stopping: waiting for the drain to finish")
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("collector stopping")
        try:
            await self.connections.drain()
            await self._close_resources(clean=True)
        finally:
            self._stopped.set()
        log.info("collector stopped")

    async def _close_resources(self, *, clean: bool, unlink_shm: bool | None = None) -> None:
        for task in list(self._background):
            await _cancel(task)
        if self.hub is not None:  # a last publish while the counters are still open
            await self.hub.close(final=clean)
        await self.connections.close()
        await self.retries.close()
        await asyncio.to_thread(self.lifecycle.close)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        live, self._live = self._live, None
        unsaved: SnapshotNotSaved | None = None
        if live is not None:
            await live.group.close()
            live.journal.close()
            remove = clean if unlink_shm is None else unlink_shm
            if clean:
                # Counters outlive a clean restart through a snapshot file. Unlinking the
                # segment without one would zero every counter: keep it instead.
                try:
                    live.stats.save(self.settings.counters_file)
                except (OSError, QdashError) as exc:
                    remove = False
                    unsaved = SnapshotNotSaved(
                        f"could not save the counters to {self.settings.counters_file} ({exc}); "
                        f"kept the shared-memory segment {live.stats.name!r}: the next start "
                        "reattaches to it with the counts intact (free disk space first)"
                    )
                    log.error("%s", unsaved)
            if remove:
                live.stats.unlink()
            live.stats.close()
        if clean:
            self.settings.socket.unlink(missing_ok=True)
            self.settings.state_file.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if unsaved is not None:
            raise unsaved


def _check_socket_path(path: Path) -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise CollectorError(
            f"socket path {str(path)!r} is {size} bytes, over the {MAX_SOCKET_PATH} byte limit "
            "of Unix sockets; pass a shorter --socket or --data-dir"
        )


def _make_dir(path: Path, created: list[Path]) -> None:
    missing = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    created.extend(reversed(missing))
    probe = path / ".qdash-write-probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise CollectorError(
            f"data dir {path} is not writable ({exc.strerror}); pass another --data-dir"
        ) from exc


def _remove_created(created: list[Path], s: CollectorSettings) -> None:
    """Undo a failed start: files this start made, newest first (dirs only if empty)."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                if path.name in ("journal", "history"):
                    shutil.rmtree(path)
                else:
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it, bounded: a task that swallows a cancellation (redis-py's
    asyncio client has, when cancelled at the wrong moment of a command: redis/redis-py#2028,
    #2633) is cancelled again, and after ``CANCEL_ROUNDS`` it is logged with its stack and left
    behind instead of hanging the stop."""
    for _ in range(CANCEL_ROUNDS):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CANCEL_WAIT)
        if done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("%s ended with an error while stopping: %r", task.get_name(), exc)
            return
    frames = "".join(f"\n  {f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack())
    log.error("%s did not stop after %d cancellations; left behind at:%s",
              task.get_name(), CANCEL_ROUNDS, frames)  # fmt: skip


def _describe_os_error(exc: OSError, s: CollectorSettings) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write in {s.data_dir}{where}: {exc.strerror}; pass another --data-dir"
    return f"cannot start the collector{where}: {exc.strerror or exc}"


async def serve(
    settings: CollectorSettings,
    *,
    ready: Callable[[Collector], Awaitable[None] | None] | None = None,
) -> None:
    """Run a collector until SIGTERM/SIGINT, then stop it cleanly.

    The signal handlers are installed before the collector starts (``collector.json``, the
    sign that it is ready, is written during ``start``: a signal sent on seeing it must find
    them) and stay installed while stopping: a second signal is logged, not fatal.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s received: already stopping, finishing the drain first", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        collector = Collector(settings)
        await collector.start()
        try:
            if ready is not None:
                result = ready(collector)
                if inspect.isawaitable(result):
                    await result
            await stop.wait()
        finally:
            await collector.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(settings: CollectorSettings) -> None:
    """``qdash-mp collector``: serve in the foreground until a signal."""
    asyncio.run(serve(settings))
