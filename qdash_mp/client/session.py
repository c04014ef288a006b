"""One client id's stream of numbered batches to the collector, over one connection at a time.

The connection state machine that both the live sender (``qdash_mp.client.sender``) and the
spool replayer (``qdash_mp.client.replay``) drive; neither has a copy of its own::

    state         enters on                      leaves on
    idle          start, or a connection lost    connect(): socket up, HELLO sent
    hello         connect()                      WELCOME -> welcomed; ERROR, timeout,
                                                 anything else -> idle (with backoff)
    welcomed      WELCOME(last_seq)              ERROR, bad frame, EOF -> idle (with backoff)

On WELCOME every batch up to ``last_seq`` counts as acknowledged and the rest of ``unacked``
is sent again, in order; ACKs are cumulative. Backoff doubles from 50 ms up to
``reconnect_max`` and starts over at each WELCOME. HELLO offers ``PROTOCOL_VERSION`` (2, with
the ``name``/``track`` info); ``version`` is what WELCOME settled on (batches carry BATCH v2's
``ext`` only when it is 2). ERROR ``version`` makes the next HELLO offer version 1 at once;
refused again, backoff goes straight to the maximum. The session never sleeps and owns no
thread: its driver selects on ``sock`` (registered in the driver's selector at ``connect``)
and calls ``on_event``; what happened is reported to a ``SessionEvents``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import time

from qdash_mp.errors import ProtocolError
from qdash_mp.wire import (
    MAX_FRAME,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Ack,
    ErrorCode,
    ErrorMsg,
    FrameDecoder,
    Hello,
    Requeue,
    Welcome,
    encode,
)

__all__ = ["CONNECT_TIMEOUT", "HANDSHAKE_TIMEOUT", "Session", "SessionEvents", "new_selector"]

log = logging.getLogger("qdash_mp.client.session")


def new_selector() -> selectors.BaseSelector:
    """The selector a session's driver waits in: ``poll(2)`` where there is one, not epoll.

    Why: when a process is stopped and continued (SIGSTOP / SIGCONT: job control, a
    debugger, a cgroup freeze, a benchmark's turns), Linux makes ``epoll_wait`` return EINTR
    (signal(7)); Python then takes the GIL back from the worker's busy threads to check for
    signals, and waits again: ~50 us more CPU a resume than ``poll`` (docs/client.md). The
    kernel restarts ``poll`` itself, so the thread runs no Python for it. With the two or
    three sockets a driver has, ``poll`` costs no more than epoll, and a forked child shares
    no epoll instance with its parent.
    """
    poll = getattr(selectors, "PollSelector", None)
    return poll() if poll is not None else selectors.DefaultSelector()


CONNECT_TIMEOUT = 1.0
HANDSHAKE_TIMEOUT = 5.0
FIRST_BACKOFF = 0.05
_SOCK = "sock"
"""Selector key data of the session's socket (the driver's other keys carry other data)."""


class SessionEvents:
    """What a session tells its driver; every method is a no-op here."""

    def on_unreachable(self, reason: str) -> None:
        """A connection attempt failed (a reconnect is scheduled)."""

    def on_connected(self) -> None:
        """The socket is up; HELLO goes out right after (the stream may still be changed)."""

    def on_welcome(self, failures: int) -> None:
        """WELCOME arrived after ``failures`` failed connection attempts."""

    def on_lost(self, reason: str) -> None:
        """A connection broke (a reconnect is scheduled)."""

    def on_refused(self, msg: ErrorMsg) -> None:
        """The collector answered ERROR and the connection was closed."""

    def on_acked(self, seq: int) -> None:
        """Every batch up to ``seq`` is acknowledged now."""

    def on_requeue(self, msg: Requeue) -> bool:
        """A REQUEUE request arrived; False (no taker) drops the connection."""
        return False


class Session:
    """The stream ``client_id`` (batches 1..``seq``, ``acked`` of them acknowledged) and its
    connection. ``unacked`` holds ``(seq, frame)`` not yet covered by an ACK, at most ``window``
    of which are numbered while connected (``room``).
    """

    __slots__ = (
        "_decoder",
        "_events",
        "_hello_deadline",
        "_out",
        "_sel",
        "acked",
        "backoff",
        "client_id",
        "conn_gen",
        "connect_failures",
        "host",
        "lost",
        "name",
        "next_connect",
        "offer",
        "reconnect_max",
        "refused",
        "requeue",
        "seq",
        "sock",
        "socket_path",
        "track",
        "unacked",
        "version",
        "welcomed",
        "window",
    )

    def __init__(
        self,
        socket_path: str,
        host: str,
        events: SessionEvents,
        *,
        window: int,
        reconnect_max: float,
        requeue: tuple[str, ...] | None = None,
        name: str = "",
        track: tuple[str, ...] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.name = name
        self.track = track
        self.offer = PROTOCOL_VERSION
        """The version the next HELLO says (1 after the collector refused 2)."""
        self.version = PROTOCOL_VERSION
        """The version the last WELCOME settled on."""
        self.host = host
        self._events = events
        self.window = window
        self.reconnect_max = reconnect_max
        self.requeue = requeue
        self.client_id = ""
        self.seq = 0
        self.acked = 0
        self.unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self.sock: socket.socket | None = None
        self.conn_gen = 0
        self.welcomed = False
        self._decoder = FrameDecoder(MAX_FRAME)
        self._out = bytearray()
        self._sel: selectors.BaseSelector | None = None
        self._hello_deadline = 0.0
        self.backoff = FIRST_BACKOFF
        self.next_connect = 0.0
        self.connect_failures = 0
        self.lost: str | None = None
        """Why the last connection (attempt) ended; ``None`` while up or closed on purpose."""
        self.refused: ErrorMsg | None = None
        """The ERROR that ended the last connection, if one did."""

    # ------------------------------------------------------------------ the stream

    def new_stream(self, client_id: str, *, seq: int = 0, acked: int = 0) -> None:
        """Go on as ``client_id``, whose batches 1..``seq`` exist (``acked`` acknowledged)."""
        self.client_id = client_id
        self.seq = seq
        self.acked = acked
        self.unacked.clear()

    @property
    def room(self) -> bool:
        """A new batch could go out on the live connection right now."""
        return self.welcomed and len(self.unacked) < self.window

    def push(self, seq: int, frame: bytes) -> None:
        """Keep batch ``seq`` until acknowledged; send it now if welcomed."""
        self.unacked.append((seq, frame))
        if self.welcomed:
            self.send(frame)

    # ------------------------------------------------------------------ connection

    def connect(self, sel: selectors.BaseSelector) -> bool:
        """Connect (blocking, at most ``CONNECT_TIMEOUT``), register in ``sel``, say HELLO."""
        self.lost = None
        self.refused = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            self._unreachable(f"no socket: {exc}")
            return False
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self.socket_path)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self._unreachable(str(exc))
            return False
        self._events.on_connected()
        self.sock = sock
        self._sel = sel
        self.conn_gen += 1
        self.welcomed = False
        self._decoder = FrameDecoder(MAX_FRAME)
        self._out = bytearray()
        self._hello_deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        sel.register(sock, selectors.EVENT_READ, _SOCK)
        hello = Hello(
            client_id=self.client_id,
            pid=os.getpid(),
            host=self.host,
            requeue=self.requeue,
            version=self.offer,
            name=self.name,
            track=self.track,
        )
        self.send(encode(hello))
        return True

    def _unreachable(self, reason: str) -> None:
        self.lost = reason
        self.connect_failures += 1
        self.schedule_reconnect()
        self._events.on_unreachable(reason)

    def schedule_reconnect(self) -> None:
        self.next_connect = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.reconnect_max)

    def disconnect(self, reason: str | None) -> None:
        """Close the connection; with a ``reason`` it was lost (reported, reconnect later)."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        self.welcomed = False
        self._out = bytearray()
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        sock.close()
        if reason is not None:
            self.lost = reason
            self.schedule_reconnect()
            self._events.on_lost(reason)

    def forget_in_child(self) -> None:
        """(Forked child) Close this process's copy of the socket, nothing else."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        self._sel = None

    def check_handshake(self, now: float) -> None:
        """Drop a connection whose WELCOME is overdue."""
        if self.sock is not None and not self.welcomed and now >= self._hello_deadline:
            self.disconnect(f"no WELCOME from the collector within {HANDSHAKE_TIMEOUT:g} s")

    @property
    def hello_deadline(self) -> float:
        return self._hello_deadline

    def update_interest(self) -> None:
        """Select for writing only while output is queued."""
        sock, sel = self.sock, self._sel
        if sock is None or sel is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        if sel.get_key(sock).events != events:
            sel.modify(sock, events, _SOCK)

    @staticmethod
    def is_mine(data: object) -> bool:
        """Is a selector key with this ``data`` the session's socket?"""
        return data == _SOCK

    def on_event(self, mask: int) -> None:
        """The socket is readable and/or writable (a selector's ``mask``)."""
        if mask & selectors.EVENT_READ:
            self._on_readable()
        if self.sock is not None and mask & selectors.EVENT_WRITE:
            self.flush_out()

    def send(self, frame: bytes) -> None:
        self._out += frame
        self.flush_out()

    def flush_out(self) -> None:
        sock = self.sock
        out = self._out
        while sock is not None and out:
            try:
                n = sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.disconnect(f"send failed: {exc}")
                return
            del out[:n]

    # ------------------------------------------------------------------ receiving

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.disconnect(f"receive failed: {exc}")
            return
        if not data:
            self.disconnect("closed by the collector")
            return
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            self.disconnect(f"bad frame from the collector: {exc}")
            return
        for msg in messages:
            if self.sock is None:
                return
            self._handle(msg)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, Welcome):
            if self.welcomed:
                self.disconnect("second WELCOME")
                return
            if msg.version > self.offer:
                self.disconnect(f"WELCOME of version {msg.version}, HELLO said {self.offer}")
                return
            self.version = msg.version
            self._on_welcome(msg.last_seq)
        elif isinstance(msg, ErrorMsg):
            self._on_error(msg)
        elif not self.welcomed:
            self.disconnect(f"expected WELCOME, got {type(msg).__name__}")
        elif isinstance(msg, Ack):
            self._on_ack(msg.seq)
        elif not (isinstance(msg, Requeue) and self._events.on_requeue(msg)):
            self.disconnect(f"unexpected {type(msg).__name__} from the collector")

    def _on_welcome(self, last_seq: int) -> None:
        self.welcomed = True
        self.backoff = FIRST_BACKOFF
        failures, self.connect_failures = self.connect_failures, 0
        self._events.on_welcome(failures)
        if last_seq > self.seq:
            # The collector knows more batches of this id than we ever made (an id clash):
            # number on from there so new batches are not mistaken for duplicates.
            log.warning(
                "qdash_mp client: collector reports batch %d applied for client %s, which "
                "only made %d; continuing from %d",
                last_seq,
                self.client_id,
                self.seq,
                last_seq,
            )
            self.seq = last_seq
        self._on_ack(last_seq)
        for _seq, frame in self.unacked:
            self._out += frame
        self.flush_out()

    def _on_ack(self, seq: int) -> None:
        seq = min(seq, self.seq)
        unacked = self.unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()
        if seq > self.acked:
            self.acked = seq
            self._events.on_acked(seq)

    def _on_error(self, msg: ErrorMsg) -> None:
        self.disconnect(None)
        self.refused = msg
        self.lost = f"ERROR {msg.code}: {msg.reason}"
        if msg.code == ErrorCode.VERSION and self.offer > MIN_PROTOCOL_VERSION:
            # An older collector: say HELLO again at once in the version it speaks.
            self.offer = MIN_PROTOCOL_VERSION
        elif msg.code == ErrorCode.VERSION:
            self.backoff = self.reconnect_max
        self.schedule_reconnect()
        self._events.on_refused(msg)
