"""A bare-protocol client for collector tests: HELLO, frames as given, messages as they come.

``qdash_mp.Client`` hides sequence numbers, resends and ACK timing; tests of the collector's
side of the protocol need to send exactly the frames they mean (hand-made ones included).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

from qdash_mp.models import Job
from qdash_mp.wire import (
    Ack,
    Batch,
    ErrorMsg,
    FailedRecord,
    FrameDecoder,
    Hello,
    Message,
    encode,
    pack_failed_record,
)

TIMEOUT = 10.0


class RawClient:
    """One connection to a collector socket, driven from an asyncio test."""

    def __init__(self, client_id: str | None = None) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = FrameDecoder()
        self.inbox: list[Message] = []
        self.welcome_seq = -1
        self.base_time = float(int(time.time()))
        """FAILED records of this client fail at ``base_time + i`` (recent: kept by retention)."""

    async def connect(self, path: str) -> RawClient:
        self.reader, self.writer = await asyncio.open_unix_connection(path)
        self.send_raw(encode(Hello(client_id=self.client_id, pid=os.getpid(), host="test")))
        try:
            welcome = await self.next_message()
        except BaseException:
            await self.close()
            raise
        self.welcome_seq = getattr(welcome, "last_seq", -1)
        return self

    def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    def send_batch(
        self, seq: int, counters: dict[str, tuple[int, int, int, int]], failed: int = 0
    ) -> None:
        records = tuple(
            pack_failed_record(
                FailedRecord.from_job(
                    Job(id=f"{self.client_id[:8]}-{seq}-{i}", name="t", payload={"i": i}),
                    "q",
                    "boom",
                    failed_at=self.base_time + i,
                )
            )
            for i in range(failed)
        )
        self.send_raw(encode(Batch(seq=seq, counters=counters, failed=records)))

    async def next_message(self, timeout: float = TIMEOUT) -> Message | None:
        """The next message, or ``None`` at EOF."""
        assert self.reader is not None
        async with asyncio.timeout(timeout):
            while not self.inbox:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    async def ack(self, timeout: float = TIMEOUT) -> int:
        msg = await self.next_message(timeout)
        assert isinstance(msg, Ack), msg
        return msg.seq

    async def error(self, timeout: float = TIMEOUT) -> ErrorMsg:
        while True:
            msg = await self.next_message(timeout)
            assert msg is not None, "closed without ERROR"
            if isinstance(msg, ErrorMsg):
                return msg

    async def nothing_within(self, seconds: float) -> bool:
        """True if no message arrives within ``seconds`` (for "not yet" checks)."""
        try:
            msg = await self.next_message(seconds)
        except TimeoutError:
            return True
        if msg is not None:
            self.inbox.insert(0, msg)
        return False

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
