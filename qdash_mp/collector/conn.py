"""One client connection of the collector: who it is (``SO_PEERCRED``) and its state.

``Connections`` (``collector/connections.py``) runs the protocol; this is what it keeps per
connection, and the refusal it raises for a well-formed frame it will not take.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

from qdash_mp.errors import ProtocolError
from qdash_mp.wire import (
    ALL_QUEUES,
    ErrorCode,
    FrameDecoder,
    Hello,
    Message,
    RequeueResult,
    encode,
)

__all__ = ["Conn", "PeerCred", "Refused", "peer_credentials"]

_UCRED = struct.Struct("3i")


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


class Refused(ProtocolError):
    """A well-formed frame the collector will not take here; ``code`` goes in the ERROR."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(eq=False)
class Conn:
    """One connected client."""

    peer: PeerCred
    writer: asyncio.StreamWriter
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    hello: Hello | None = None
    pending: dict[int, asyncio.Future[RequeueResult]] = field(default_factory=dict)
    ack_wanted: int = 0
    failed_seq: int = 0
    """Highest seq of a batch that carried failed jobs (they need a commit before its ACK)."""
    durable_seq: int = 0
    """Highest ``failed_seq`` known committed."""
    held: int = 0
    """Bytes of a partial frame this connection holds (counted in the global budget)."""
    evicted: str | None = None
    worker_token: int = 0
    """This connection's token in the workers registry (see ``Workers.connect``)."""
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
