"""The collector daemon: one asyncio process that workers' ``Client`` hooks report to.

It listens on a Unix socket (owner-only by default, peers checked with ``SO_PEERCRED``),
speaks ``qdash_mp.protocol``, applies counter deltas to the shared-memory ``SharedStats``
(exactly once per ``(client id, seq)``), journals failed jobs durably before acknowledging
them, routes dashboard retries back to a worker that registered a ``requeue`` callback, and
serves the dashboard over HTTP on the same loop.

Life cycle: ``await Collector(settings).start()`` takes the data-dir lock, replaces a stale
socket (or refuses to start next to a live collector), opens the journal and the stats,
listens, and writes ``<data-dir>/collector.json``. ``await stop()`` stops accepting, answers
what is in flight, commits the journal, and removes the socket, the state file and (after
saving a counters snapshot) the shared-memory segment. ``run(settings)`` does both around
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import itertools
import json
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from qdash_mp.errors import (
    CollectorError,
    ConfigError,
    JournalError,
    ProtocolError,
    QdashError,
    RetryConflict,
    RetryError,
    RetryUnavailable,
)
from qdash_mp.fsio import try_flock, write_atomically
from qdash_mp.inspector import page_bounds
from qdash_mp.journal import GroupCommit, Journal
from qdash_mp.models import FailedJob, Job, JobView, StatsView
from qdash_mp.settings import CollectorSettings
from qdash_mp.shm import SharedStats
from qdash_mp.web.collector_app import collector_app
from qdash_mp.wire import (
    ALL_QUEUES,
    PROTOCOL_VERSION,
    Ack,
    Batch,
    ErrorCode,
    ErrorMsg,
    FailedRecord,
    FrameDecoder,
    Hello,
    Message,
    Requeue,
    RequeueResult,
    UnsupportedVersion,
    Welcome,
    encode,
)

__all__ = ["Collector", "CollectorInspector", "PeerCred", "load_requeue", "peer_credentials", "run"]

log = logging.getLogger("qdash_mp.collector")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has to send HELLO."""

REQUEUE_TIMEOUT = 30.0
"""Seconds a worker has to answer a REQUEUE."""

READ_SIZE = 256 * 1024

STOP_TIMEOUT = 5.0
"""Seconds a stopping collector waits for in-flight batches to be answered."""

LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
"""How long/much a connection being closed for an error is drained (see ``_close_with``)."""

_UCRED = struct.Struct("3i")

RequeueFn = Callable[[Job], object]


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The kernel's word on who is at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """``SO_PEERCRED`` of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def load_requeue(spec: str) -> RequeueFn:
    """Import ``module:function`` (for ``--requeue``); ``ConfigError`` says what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--requeue expects module:function, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--requeue: cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"--requeue: {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"--requeue: {spec!r} is not callable")
    fn: RequeueFn = target
    return fn


class _Refused(ProtocolError):
    """A well-formed frame the collector will not take here; ``code`` goes in the ERROR."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(eq=False)
class _Conn:
    """One connected client."""

    peer: PeerCred
    writer: asyncio.StreamWriter
    hello: Hello | None = None
    pending: dict[int, asyncio.Future[RequeueResult]] = field(default_factory=dict)
    ack_wanted: int = 0
    ack_event: asyncio.Event = field(default_factory=asyncio.Event)
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    def label(self) -> str:
        cid = self.hello.client_id[:12] if self.hello else "-"
        return f"pid={self.peer.pid} uid={self.peer.uid} client={cid}"

    def can_requeue(self, queue: str) -> bool:
        req = self.hello.requeue if self.hello else None
        return req is not None and (ALL_QUEUES in req or queue in req)

    def send(self, msg: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(msg))


@dataclass(frozen=True, slots=True)
class _Live:
    """What a started collector has open."""

    stats: SharedStats
    journal: Journal
    group: GroupCommit


class Collector:
    """The daemon's state and servers; see the module docstring for the life cycle."""

    def __init__(self, settings: CollectorSettings, *, requeue: RequeueFn | None = None) -> None:
        self.settings = settings
        self._requeue_fn = requeue
        if requeue is None and settings.requeue:
            self._requeue_fn = load_requeue(settings.requeue)
        self._live: _Live | None = None
        self._server: asyncio.base_events.Server | None = None
        self._runner: web.AppRunner | None = None
        self._lock_fd: int | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._request_ids = itertools.count(1)
        self._rr = itertools.count()
        self._retrying: set[str] = set()
        self._stopping = False
        self.http_url: str | None = None
        self.stats_version = 0
        """Bumped whenever this collector changes the counters (views can be cached by it)."""
        self.inspector = CollectorInspector(self)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Open everything and start serving; ``CollectorError`` if that is not possible."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._clear_stale_socket()
            journal = await asyncio.to_thread(
                Journal.open,
                s.data_dir / "journal",
                salvage=s.salvage,
                max_jobs=s.max_failed_jobs,
                max_age=s.max_failed_age,
            )
            try:
                stats = SharedStats.create_or_attach(s.shm, restore_from=s.counters_file)
            except BaseException:
                journal.close()
                raise
            # Restored, or stale next to a segment that survived a crash: either way the
            # snapshot has served; left behind it could later roll counters back.
            s.counters_file.unlink(missing_ok=True)
            self._live = _Live(stats, journal, GroupCommit(journal))
            await self._listen()
            if s.http_enabled:
                await self._serve_http()
            self._write_state()
            self._spawn(self._maintenance(), "qdash_mp.maintenance")
        except BaseException:
            await self._close_resources(clean=False)
            raise
        log.info(
            "collector ready: socket %s, dashboard %s, shared memory %s, %d failed jobs",
            s.socket,
            self.http_url or "(off)",
            s.shm,
            len(self.live.journal),
        )

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
    def live(self) -> _Live:
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

    def _take_lock(self) -> None:
        path = self.settings.data_dir / "collector.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not try_flock(fd):
            os.close(fd)
            raise CollectorError(
                f"another collector is using {self.settings.data_dir} "
                f"(see {self.settings.state_file}); stop it first or pass another --data-dir"
            ) from None
        self._lock_fd = fd

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

    async def _listen(self) -> None:
        path = self.settings.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)  # the socket is born owner-only: no window with looser modes
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, path=str(path), limit=READ_SIZE
            )
        finally:
            os.umask(old)
        os.chmod(path, self.settings.socket_mode)

    async def _serve_http(self) -> None:
        app = collector_app(self)

        async def root(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(str(request.app.router["qdash.overview"].url_for()))

        app.router.add_get("/", root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
        await site.start()
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

    async def stop(self) -> None:
        """Stop accepting, answer what is in flight, make it durable, remove runtime files."""
        if self._stopping:
            return
        self._stopping = True
        log.info("collector stopping")
        if self._server is not None:
            self._server.close()
        # Answer in-flight batches: wait for the acks owed, then close every connection.
        conns = list(self._conns)
        if conns:
            waits = [asyncio.create_task(c.caught_up.wait()) for c in conns]
            await asyncio.wait(waits, timeout=STOP_TIMEOUT)
            for w in waits:
                w.cancel()
        for conn in conns:
            await self._close_with(conn, ErrorCode.SHUTDOWN, "collector is shutting down")
            conn.writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
        await self._close_resources(clean=True)
        log.info("collector stopped")

    async def _close_resources(self, *, clean: bool) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in list(self._conns):
            conn.writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()
        live, self._live = self._live, None
        if live is not None:
            await live.group.close()
            live.journal.close()
            if clean:
                # Counters outlive a clean restart through a snapshot file, not the segment.
                try:
                    live.stats.save(self.settings.counters_file)
                except (OSError, QdashError) as exc:
                    log.error("could not save the counters (they restart from 0): %s", exc)
                live.stats.unlink()
            live.stats.close()
        if clean:
            self.settings.socket.unlink(missing_ok=True)
            self.settings.state_file.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    def _allowed(self, peer: PeerCred) -> bool:
        s = self.settings
        return peer.uid == os.getuid() or peer.uid in s.allow_uids or peer.gid in s.allow_gids

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock)
        conn = _Conn(peer=peer, writer=writer)
        if not self._allowed(peer):
            await self._close_with(
                conn,
                ErrorCode.REFUSED,
                f"uid {peer.uid} (gid {peer.gid}) is not allowed on this socket "
                "(the collector accepts its own uid, --allow-uid and --allow-gid)",
                reader,
            )
            writer.close()
            return
        decoder = FrameDecoder()
        acker: asyncio.Task[None] | None = None
        self._conns.add(conn)
        try:
            hello = await asyncio.wait_for(self._handshake(reader, decoder), HANDSHAKE_TIMEOUT)
            conn.hello = hello
            log.info(
                "client connected: %s host=%s requeue=%s",
                conn.label(),
                hello.host,
                list(hello.requeue) if hello.requeue is not None else None,
            )
            conn.send(Welcome(last_seq=self._last_seq(hello.client_id)))
            acker = asyncio.create_task(self._ack_loop(conn))
            while not self._stopping:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for msg in decoder.feed(data):
                    self._dispatch(conn, hello.client_id, msg)
        except TimeoutError:
            reason = f"no HELLO within {HANDSHAKE_TIMEOUT:g}s"
            await self._close_with(conn, ErrorCode.HANDSHAKE, reason, reader)
        except UnsupportedVersion as exc:
            await self._close_with(conn, ErrorCode.VERSION, str(exc), reader)
        except ProtocolError as exc:
            code = exc.code if isinstance(exc, _Refused) else ErrorCode.PROTOCOL
            await self._close_with(conn, code, str(exc), reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("client %s went away", conn.label())
        finally:
            self._conns.discard(conn)
            for fut in conn.pending.values():
                if not fut.done():
                    fut.set_exception(
                        RetryError(f"worker {conn.label()} disconnected before answering")
                    )
            if acker is not None:
                await self._finish_acks(acker)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if conn.hello is not None:
                log.info("client disconnected: %s", conn.label())

    async def _finish_acks(self, acker: asyncio.Task[None]) -> None:
        acker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acker

    async def _close_with(
        self,
        conn: _Conn,
        code: str,
        reason: str,
        reader: asyncio.StreamReader | None = None,
    ) -> None:
        """Log why, send ERROR, and (given ``reader``) linger so the peer can read it.

        Closing a Unix socket with unread input makes the peer's ``recv`` fail with
        ECONNRESET, losing the ERROR frame; so the write side is shut first and what the
        peer still sends is read and dropped, for at most ``LINGER_BYTES``/``LINGER_SECONDS``.
        """
        log.warning("closing connection %s: %s (%s)", conn.label(), reason, code)
        with contextlib.suppress(Exception):
            conn.send(ErrorMsg(code=str(code), reason=reason))
            await conn.writer.drain()
        if reader is None:
            return
        with contextlib.suppress(Exception):
            conn.writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                seen = 0
                while seen < LINGER_BYTES and (chunk := await reader.read(READ_SIZE)):
                    seen += len(chunk)

    async def _handshake(self, reader: asyncio.StreamReader, decoder: FrameDecoder) -> Hello:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("closed before HELLO")
            msgs = decoder.feed(data)
            if not msgs:
                continue
            first = msgs[0]
            if not isinstance(first, Hello):
                raise _Refused(
                    ErrorCode.HANDSHAKE, f"first frame must be HELLO, got {type(first).__name__}"
                )
            if first.version != PROTOCOL_VERSION:
                raise UnsupportedVersion(first.version)
            if len(msgs) > 1:
                raise _Refused(ErrorCode.HANDSHAKE, "frames sent before WELCOME")
            return first

    def _dispatch(self, conn: _Conn, client_id: str, msg: Message) -> None:
        if isinstance(msg, Batch):
            self._on_batch(conn, client_id, msg)
        elif isinstance(msg, RequeueResult):
            fut = conn.pending.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            raise _Refused(ErrorCode.HANDSHAKE, f"{type(msg).__name__} is not a client message")

    def _last_seq(self, client_id: str) -> int:
        """The WELCOME seq: every batch up to it is applied *and* its failed jobs are durable.

        Counters are applied (shared memory) as a batch arrives, its failed jobs become
        durable only at the next journal commit; a crash in between leaves the shared-memory
        seq ahead of the journal's. The client must then resend from the journal's seq (the
        counters of the resent batches are skipped by the shared-memory seq). The journal
        only records seqs of batches that carried failed jobs, so a client that never failed
        anything is told 0 and resends what it holds unacknowledged, which costs nothing.
        """
        live = self.live
        return min(live.stats.client_seq(client_id), live.journal.client_seqs.get(client_id, 0))

    def _on_batch(self, conn: _Conn, client_id: str, batch: Batch) -> None:
        """Apply a batch exactly once, stage its failed jobs, and owe the client an ACK.

        Counters and the client's seq change together in shared memory (one redo commit),
        so a batch resent after a crash is recognised. Failed jobs are deduplicated by the
        journal's own committed seq: a batch whose counters were applied before a crash but
        whose failed jobs never reached the disk gets them staged again.
        """
        live = self.live
        last = live.stats.client_seq(client_id)
        if last > 0 and batch.seq > last + 1:
            raise _Refused(ErrorCode.SEQUENCE, f"batch seq {batch.seq} skips ahead of {last + 1}")
        if batch.seq > last:
            live.stats.apply_batch(batch.counters, client=(client_id, batch.seq))
            self.stats_version += 1
        if batch.failed and batch.seq > live.journal.client_seqs.get(client_id, 0):
            # The FAILED arrays were checked by the decoder and are journaled as received.
            live.journal.stage_failed_packed(batch.failed)
            live.journal.stage_client_seq(client_id, batch.seq)
        conn.ack_wanted = max(conn.ack_wanted, batch.seq)
        conn.caught_up.clear()
        conn.ack_event.set()

    async def _ack_loop(self, conn: _Conn) -> None:
        """Send cumulative ACKs once what they cover is durable (one group commit each).

        Every batch received sets ``ack_event``, resent duplicates included (their first
        ACK may be what the client missed).
        """
        group = self.live.group
        conn.caught_up.set()
        while True:
            await conn.ack_event.wait()
            conn.ack_event.clear()
            target = conn.ack_wanted
            await self._commit_until_durable(group, conn)
            conn.send(Ack(seq=target))
            if target >= conn.ack_wanted:
                conn.caught_up.set()
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()

    async def _commit_until_durable(self, group: GroupCommit, conn: _Conn) -> None:
        """Commit the journal, retrying with backoff: an ACK is never sent before that."""
        delay, failures = 0.01, 0
        while True:
            try:
                await group.commit()
                return
            except JournalError as exc:
                if failures % 30 == 0:
                    log.error(
                        "journal commit failed (%s); %s stays unacknowledged, retrying",
                        exc,
                        conn.label(),
                    )
                failures += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------------ retries

    async def requeue(self, failed: FailedJob, payload_raw: bytes | None = None) -> None:
        """Hand ``failed.job`` back to a worker (or ``--requeue``); raise if that failed.

        ``payload_raw`` (the payload's msgpack bytes as journaled) is sent to the worker as
        is, so a retry carries exactly the bytes the failing worker sent.
        """
        if self._requeue_fn is not None:
            fn = self._requeue_fn
            if inspect.iscoroutinefunction(fn):
                await fn(failed.job)
            else:
                outcome = await asyncio.to_thread(fn, failed.job)
                if inspect.isawaitable(outcome):
                    await outcome
            return
        candidates = [c for c in self._conns if c.can_requeue(failed.queue)]
        if not candidates:
            raise RetryUnavailable(
                f"no connected worker accepts retries for queue {failed.queue!r}: start a worker "
                "with Client(requeue=...) or run the collector with --requeue module:function"
            )
        conn = candidates[next(self._rr) % len(candidates)]
        request_id = next(self._request_ids)
        fut: asyncio.Future[RequeueResult] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = fut
        conn.send(
            Requeue(
                request_id=request_id,
                queue=failed.queue,
                failed=FailedRecord.from_failed_job(failed, payload_raw=payload_raw),
            )
        )
        try:
            answer = await asyncio.wait_for(fut, REQUEUE_TIMEOUT)
        except TimeoutError:
            raise RetryError(
                f"worker {conn.label()} did not answer the requeue within {REQUEUE_TIMEOUT:g}s"
            ) from None
        finally:
            conn.pending.pop(request_id, None)
        if not answer.ok:
            raise RetryError(f"worker {conn.label()} could not requeue the job: {answer.error}")

    async def retry(self, id: str) -> None:
        """Requeue failed job ``id``; it leaves the journal only once that succeeded."""
        live = self.live
        if id in self._retrying:
            raise RetryConflict(f"a retry of job {id!r} is already in progress")
        failed, payload_raw = await asyncio.to_thread(live.journal.get_raw, id)
        failed_at = await asyncio.to_thread(live.journal.failed_at, id)
        self._retrying.add(id)
        try:
            await self.requeue(failed, payload_raw)
            # A newer failure of the same job that arrived meanwhile stays.
            if live.journal.stage_removed(id, "retried", if_failed_at=failed_at):
                await live.group.commit()
        finally:
            self._retrying.discard(id)
        live.stats.add(failed.queue, retried=1)
        self.stats_version += 1

    async def forget(self, id: str) -> None:
        """Drop failed job ``id`` (durably); ``NotFound`` if unknown."""
        live = self.live
        live.journal.stage_removed(id, "forgotten")
        await live.group.commit()

    async def flush_failed(self) -> int:
        """Drop every failed job (durably); returns how many there were."""
        live = self.live
        n = len(live.journal)
        live.journal.stage_flush()
        await live.group.commit()
        return n


class CollectorInspector:
    """The dashboard's ``Inspector`` over a running collector's shared stats and journal."""

    def __init__(self, collector: Collector) -> None:
        self._c = collector
        self._view: tuple[tuple[int, int], StatsView] | None = None

    async def stats(self) -> StatsView:
        # One snapshot per counters change and second (throughput moves with the clock):
        # many open dashboards cost the daemon one snapshot, not one each.
        key = (self._c.stats_version, int(time.time()))
        if self._view is None or self._view[0] != key:
            self._view = (key, self._c.stats.snapshot())
        return self._view[1]

    async def pending(self, queue: str, page: int) -> list[JobView]:
        # The collector sees counts, not the jobs waiting in the user's queue backend.
        return []

    async def failed(self, page: int) -> list[JobView]:
        offset, limit = page_bounds(page)
        return self._c.journal.page(offset, limit)

    async def failed_count(self) -> int:
        return len(self._c.journal)

    async def failed_job(self, id: str) -> FailedJob:
        return await asyncio.to_thread(self._c.journal.get, id)

    async def retry(self, id: str) -> None:
        await self._c.retry(id)

    async def forget(self, id: str) -> None:
        await self._c.forget(id)

    async def flush_failed(self) -> int:
        return await self._c.flush_failed()


async def serve(
    settings: CollectorSettings,
    *,
    ready: Callable[[Collector], Awaitable[None] | None] | None = None,
) -> None:
    """Run a collector until SIGTERM/SIGINT, then stop it cleanly."""
    collector = Collector(settings)
    await collector.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if ready is not None:
            result = ready(collector)
            if inspect.isawaitable(result):
                await result
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await collector.stop()


def run(settings: CollectorSettings) -> None:
    """``qdash-mp collector``: serve in the foreground until a signal."""
    asyncio.run(serve(settings))
