"""A scripted collector for client tests: a real Unix socket and our real frame decoder.

``Peer(path, answer)`` accepts connections, answers each HELLO with ``answer(n, hello)``
(connection number, 1-based -> WELCOME or ERROR), ACKs every BATCH at once (connection 1 hangs
up unACKed after ``hang_up_after`` batches, if set) and records every HELLO and BATCH.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from qdash_mp.wire import Ack, Batch, ErrorMsg, FrameDecoder, Hello, Message, Welcome, encode

__all__ = ["WAIT", "Conn", "Peer", "Script", "totals", "welcome_v2"]

WAIT = 10.0

Script = Callable[[int, Hello], Message]
"""Connection number (1-based) and its HELLO -> the answer (WELCOME or ERROR)."""


@dataclass
class Conn:
    hello: Hello | None = None
    batches: list[Batch] = field(default_factory=list)


class Peer:
    """Answers HELLO with ``answer(n, hello)``; ACKs every batch (connection ``n`` hangs up
    after ``hang_up_after`` batches of it, unACKed, if set); records everything."""

    def __init__(
        self,
        path: str,
        answer: Script,
        hang_up_after: int | None = None,
    ) -> None:
        self.answer = answer
        self.hang_up_after = hang_up_after
        self.conns: list[Conn] = []
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = Conn()
        with self.lock:
            self.conns.append(conn)
            n = len(self.conns)
        decoder = FrameDecoder()
        sock.settimeout(WAIT)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for msg in decoder.feed(data):
                if isinstance(msg, Hello):
                    conn.hello = msg
                    reply = self.answer(n, msg)
                    sock.sendall(encode(reply))
                    if isinstance(reply, ErrorMsg):
                        return
                elif isinstance(msg, Batch):
                    with self.lock:
                        conn.batches.append(msg)
                    if n == 1 and self.hang_up_after == len(conn.batches):
                        return
                    sock.sendall(encode(Ack(seq=msg.seq)))

    def batches(self) -> list[Batch]:
        """Every batch received once (a resent seq of the same client id counted once)."""
        seen: dict[tuple[str, int], Batch] = {}
        with self.lock:
            for c in self.conns:
                assert c.hello is not None
                for b in c.batches:
                    seen.setdefault((c.hello.client_id, b.seq), b)
        return list(seen.values())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def received(self) -> list[list[int]]:
        """The batch seqs each connection received, in order (resends included)."""
        with self.lock:
            return [[b.seq for b in c.batches] for c in self.conns]


def totals(batches: list[Batch]) -> dict[str, object]:
    """Counters, started and bucket counts summed; the last gauges and jobs; all events."""
    counters: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    started: collections.Counter[str] = collections.Counter()
    runtime: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    wait: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    active: object = None
    jobs: object = None
    events: list[object] = []
    for b in sorted(batches, key=lambda b: b.seq):
        for q, row in b.counters.items():
            for i, n in enumerate(row):
                counters[q][i] += n
        started.update(b.started)
        for q, (r, w) in b.hist.items():
            runtime[q].update(r)
            wait[q].update(w)
        if b.active is not None:
            active, jobs = b.active, b.jobs
        events.extend(b.events)
    return {
        "counters": dict(counters),
        "started": dict(started),
        "runtime": {q: dict(c) for q, c in runtime.items()},
        "wait": {q: dict(c) for q, c in wait.items()},
        "active": active,
        "jobs": jobs,
        "events": events,
    }


def welcome_v2(n: int, hello: Hello) -> Message:
    """A ``Peer`` reply: WELCOME at the client's version, at most 2 (BATCH ``ext``)."""
    return Welcome(last_seq=0, version=min(hello.version, 2))
