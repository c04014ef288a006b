"""The collector's Unix socket: peers, handshake, batches, ACKs, and bounded resources.

Each connection is checked with ``SO_PEERCRED``, must send HELLO within
``HANDSHAKE_TIMEOUT``, and then sends BATCHes that are applied exactly once per
``(client id, seq)``. ACKs are cumulative and sent by one task per connection: a batch whose
ACK would cover failed jobs not yet durable waits for a journal group commit; an ACK covering
only counters (applied in shared memory as the batch arrived) goes out at once.

Resources a peer can hold are bounded: a partial frame must complete within
``frame_deadline`` seconds, the bytes held in partial frames across all connections stay under
``partial_frame_budget`` (over it, the connection holding the most is closed), and the warning
logged when a connection is closed for an error is rate-limited per uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

from qdash_mp.collector.conn import Conn, PeerCred, Refused, peer_credentials
from qdash_mp.collector.heap import HeapTrimmer
from qdash_mp.errors import JournalError, ProtocolError, RetryError
from qdash_mp.journal import GroupCommit
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    ErrorCode,
    ErrorMsg,
    FrameDecoder,
    Hello,
    Message,
    RequeueResult,
    UnsupportedVersion,
    Welcome,
)

if TYPE_CHECKING:
    from qdash_mp.collector.daemon import Collector

__all__ = ["Connections"]

log = logging.getLogger("qdash_mp.collector")

ACCEPTED_VERSIONS = frozenset({1, PROTOCOL_VERSION})
"""HELLO versions taken; WELCOME answers ``min(client's, PROTOCOL_VERSION)``."""

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has to send HELLO."""

READ_SIZE = 256 * 1024

STOP_TIMEOUT = 5.0
"""Seconds a stopping collector waits for in-flight batches to be answered."""

LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
"""How long/much a connection being closed for an error is drained (see ``_close_with``)."""

LOG_EVERY = 10.0
"""Per uid and kind, at most one connection log line this often (the rest are counted)."""


class Connections:
    """The socket server of one ``Collector``: every connection and its ACK task."""

    def __init__(self, collector: Collector) -> None:
        self._c = collector
        self.conns: set[Conn] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._throttle = LogThrottle(log, LOG_EVERY)
        self.partial_bytes = 0
        """Bytes held in partial frames across all connections."""
        self.heap = HeapTrimmer()
        """Gives the memory of dropped partial frames back to the OS (see ``heap.py``)."""
        self.batches = 0
        """BATCH frames received (resends included), for ``/metrics``."""
        self.errors: Counter[str] = Counter()
        """Connections closed with an error, by ERROR code (and ``evicted``), for ``/metrics``."""

    async def listen(self) -> None:
        path = self._c.settings.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)  # the socket is born owner-only: no window with looser modes
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, path=str(path), limit=READ_SIZE
            )
        finally:
            os.umask(old)
        os.chmod(path, self._c.settings.socket_mode)

    async def drain(self) -> None:
        """Stop accepting, wait (bounded) for the ACKs owed, then close every connection."""
        if self._server is not None:
            self._server.close()
        conns = list(self.conns)
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

    async def close(self) -> None:
        self.heap.close()
        for conn in list(self.conns):
            conn.writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # ------------------------------------------------------------------ one connection

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    def _allowed(self, peer: PeerCred) -> bool:
        s = self._c.settings
        return peer.uid == os.getuid() or peer.uid in s.allow_uids or peer.gid in s.allow_gids

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock)
        conn = Conn(peer=peer, writer=writer)
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
        acker: asyncio.Task[None] | None = None
        self.conns.add(conn)
        try:
            hello = await asyncio.wait_for(self._handshake(reader, conn), HANDSHAKE_TIMEOUT)
            conn.hello = hello
            self._throttle.log(
                f"connect:{peer.uid}",
                logging.INFO,
                "client connected: %s host=%s requeue=%s",
                conn.label(),
                hello.host,
                list(hello.requeue) if hello.requeue is not None else None,
            )
            workers = self._c.lifecycle.workers
            conn.worker_token = workers.connect(
                hello.client_id,
                hello.pid,
                hello.host,
                hello.name,
                hello.requeue is not None,
                self._c.lifecycle.clock(),
            )
            version = min(hello.version, PROTOCOL_VERSION)
            conn.send(Welcome(last_seq=self._last_seq(hello.client_id), version=version))
            acker = asyncio.create_task(self._ack_loop(conn))
            await self._read_loop(reader, conn, hello.client_id)
        except TimeoutError:
            if conn.hello is None:
                reason = f"no HELLO within {HANDSHAKE_TIMEOUT:g}s"
                await self._close_with(conn, ErrorCode.HANDSHAKE, reason, reader)
            else:
                reason = (
                    f"a frame did not complete within {self._c.settings.frame_deadline:g}s "
                    f"({conn.held} bytes held)"
                )
                await self._close_with(conn, ErrorCode.PROTOCOL, reason, reader)
        except UnsupportedVersion as exc:
            await self._close_with(conn, ErrorCode.VERSION, str(exc), reader)
        except ProtocolError as exc:
            code = exc.code if isinstance(exc, Refused) else ErrorCode.PROTOCOL
            await self._close_with(conn, code, str(exc), reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            self._throttle.log(
                f"gone:{peer.uid}", logging.INFO, "client %s went away", conn.label()
            )
        finally:
            self.conns.discard(conn)
            self._hold(conn, 0)
            for fut in conn.pending.values():
                if not fut.done():
                    fut.set_exception(
                        RetryError(f"worker {conn.label()} disconnected before answering")
                    )
            if acker is not None:
                acker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acker
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if conn.hello is not None:
                self._c.lifecycle.workers.disconnect(
                    conn.hello.client_id, conn.worker_token, self._c.lifecycle.clock()
                )
                self._throttle.log(
                    f"disconnect:{peer.uid}",
                    logging.INFO,
                    "client disconnected: %s",
                    conn.label(),
                )

    async def _read_loop(self, reader: asyncio.StreamReader, conn: Conn, client_id: str) -> None:
        decoder = conn.decoder
        deadline = self._c.settings.frame_deadline
        loop = asyncio.get_running_loop()
        partial_since = 0.0
        while not self._c.stopping:
            if decoder.buffered:
                # A partial frame: the rest must come before its deadline.
                async with asyncio.timeout_at(partial_since + deadline):
                    data = await reader.read(READ_SIZE)
            else:
                data = await reader.read(READ_SIZE)
            if not data or conn.evicted is not None:
                break
            before = decoder.buffered
            msgs = decoder.feed(data)
            for msg in msgs:
                self._dispatch(conn, client_id, msg)
            after = decoder.buffered
            if after and (not before or msgs):
                partial_since = loop.time()  # a new partial frame started
            if after or conn.held:
                self._hold(conn, after)
                if conn.evicted is not None:
                    break

    def _hold(self, conn: Conn, n: int) -> None:
        """Account ``n`` bytes of partial frame to ``conn``; evict the largest over budget."""
        self.partial_bytes += n - conn.held
        if n < conn.held:  # a frame completed (what stays is the start of the next one)
            self.heap.released_bytes(conn.held)
        conn.held = n
        budget = self._c.settings.partial_frame_budget
        if self.partial_bytes <= budget or not self.conns:
            return
        victim = max(self.conns, key=lambda c: c.held)
        reason = (
            f"partial frames on all connections hold {self.partial_bytes} bytes, over the "
            f"{budget} byte budget; closing the connection holding the most ({victim.held} bytes)"
        )
        self._evict(victim, reason)

    def _evict(self, conn: Conn, reason: str) -> None:
        self.errors["evicted"] += 1
        conn.evicted = reason
        self.partial_bytes -= conn.held
        self.heap.released_bytes(conn.held)
        conn.held = 0
        conn.decoder = FrameDecoder()  # drops the buffer now, not when the task gets to run
        with contextlib.suppress(Exception):
            conn.send(ErrorMsg(code=str(ErrorCode.PROTOCOL), reason=reason))
        self._throttle.log(
            f"evict:{conn.peer.uid}", logging.WARNING, "closing connection %s: %s",
            conn.label(), reason,
        )  # fmt: skip
        # close() sends the ERROR first; the reader task then sees EOF and cleans up.
        conn.writer.transport.close()

    async def _close_with(
        self,
        conn: Conn,
        code: str,
        reason: str,
        reader: asyncio.StreamReader | None = None,
    ) -> None:
        """Log why (rate-limited per uid), send ERROR, and (given ``reader``) linger.

        Closing a Unix socket with unread input makes the peer's ``recv`` fail with
        ECONNRESET, losing the ERROR frame; so the write side is shut first and what the
        peer still sends is read and dropped, for at most ``LINGER_BYTES``/``LINGER_SECONDS``.
        """
        self.errors[str(code)] += 1
        self._throttle.log(
            f"close:{conn.peer.uid}:{code}",
            logging.WARNING,
            "closing connection %s: %s (%s)",
            conn.label(),
            reason,
            code,
        )
        self._hold(conn, 0)
        conn.decoder = FrameDecoder()
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

    async def _handshake(self, reader: asyncio.StreamReader, conn: Conn) -> Hello:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("closed before HELLO")
            msgs = conn.decoder.feed(data)
            self._hold(conn, conn.decoder.buffered)
            if conn.evicted is not None:
                raise ConnectionResetError(conn.evicted)
            if not msgs:
                continue
            first = msgs[0]
            if not isinstance(first, Hello):
                raise Refused(
                    ErrorCode.HANDSHAKE, f"first frame must be HELLO, got {type(first).__name__}"
                )
            if first.version not in ACCEPTED_VERSIONS:
                raise UnsupportedVersion(first.version)
            if len(msgs) > 1:
                raise Refused(ErrorCode.HANDSHAKE, "frames sent before WELCOME")
            return first

    def _dispatch(self, conn: Conn, client_id: str, msg: Message) -> None:
        if isinstance(msg, Batch):
            self._on_batch(conn, client_id, msg)
        elif isinstance(msg, RequeueResult):
            self._c.lifecycle.workers.seen(client_id, self._c.lifecycle.clock())
            fut = conn.pending.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            raise Refused(ErrorCode.HANDSHAKE, f"{type(msg).__name__} is not a client message")

    def _last_seq(self, client_id: str) -> int:
        """The WELCOME seq: every batch up to it is applied *and* its failed jobs are durable.

        Counters are applied (shared memory) as a batch arrives, its failed jobs become
        durable only at the next journal commit; a crash in between leaves the shared-memory
        seq ahead of the journal's. The client must then resend from the journal's seq (the
        counters of the resent batches are skipped by the shared-memory seq). The journal
        only records seqs of batches that carried failed jobs, so a client that never failed
        anything is told 0 and resends what it holds unacknowledged, which costs nothing.
        """
        live = self._c.live
        return min(live.stats.client_seq(client_id), live.journal.client_seqs.get(client_id, 0))

    def _on_batch(self, conn: Conn, client_id: str, batch: Batch) -> None:
        """Apply a batch exactly once, stage its failed jobs, and owe the client an ACK.

        Counters and the client's seq change together in shared memory (one redo commit),
        so a batch resent after a crash is recognised. Failed jobs are deduplicated by the
        journal's own committed seq: a batch whose counters were applied before a crash but
        whose failed jobs never reached the disk gets them staged again.
        """
        self.batches += 1
        live = self._c.live
        last = live.stats.client_seq(client_id)
        if last > 0 and batch.seq > last + 1:
            raise Refused(ErrorCode.SEQUENCE, f"batch seq {batch.seq} skips ahead of {last + 1}")
        lc = self._c.lifecycle
        if batch.seq > last:
            try:
                live.stats.apply_batch(
                    batch.counters,
                    client=(client_id, batch.seq),
                    started=batch.started or None,
                    hist=batch.hist or None,
                )
            except (ValueError, OverflowError) as exc:
                # The decoder bounds deltas; should one still not fit, this connection is
                # refused rather than its task dying without an answer.
                raise Refused(
                    ErrorCode.PROTOCOL, f"batch seq {batch.seq} counters cannot be applied: {exc}"
                ) from exc
            self._c.stats_version += 1
            if batch.events:
                lc.tracking.apply(batch.events)
        queues = batch.counters.keys() | batch.hist.keys() if batch.hist else batch.counters
        lc.workers.batch(client_id, lc.clock(), queues, batch.active, batch.jobs)
        if batch.failed:
            if batch.seq > live.journal.client_seqs.get(client_id, 0):
                # The FAILED arrays were checked by the decoder and are journaled as received.
                # The decoder's (queue, name, error) of each go along: no second decode.
                live.journal.stage_failed_packed(batch.failed, batch.metas)
                live.journal.stage_client_seq(client_id, batch.seq)
            # Even a resent batch whose failed jobs were staged by an earlier connection
            # waits for a commit: its ACK says they are durable.
            conn.failed_seq = max(conn.failed_seq, batch.seq)
        conn.ack_wanted = max(conn.ack_wanted, batch.seq)
        conn.caught_up.clear()
        conn.ack_event.set()

    async def _ack_loop(self, conn: Conn) -> None:
        """Send cumulative ACKs; one group commit first only if failed jobs are not durable.

        Every batch received sets ``ack_event``, resent duplicates included (their first
        ACK may be what the client missed). Counter-only batches are applied in shared memory
        on arrival, so their ACK never waits on the journal.
        """
        group = self._c.live.group
        conn.caught_up.set()
        while True:
            await conn.ack_event.wait()
            conn.ack_event.clear()
            target = conn.ack_wanted
            owed = conn.failed_seq
            if owed > conn.durable_seq:
                await self._commit_until_durable(group, conn)
                conn.durable_seq = owed
            conn.send(Ack(seq=target))
            if target >= conn.ack_wanted:
                conn.caught_up.set()
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()

    async def _commit_until_durable(self, group: GroupCommit, conn: Conn) -> None:
        """Commit the journal, retrying with backoff: an ACK is never sent before that."""
        delay, failures = 0.01, 0
        while True:
            try:
                await group.commit()
                return
            except JournalError as exc:
                self.errors["journal_commit"] += 1
                if failures % 30 == 0:
                    log.error(
                        "journal commit failed (%s); %s stays unacknowledged, retrying",
                        exc,
                        conn.label(),
                    )
                failures += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
