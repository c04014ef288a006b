"""Splitting a byte stream into frames: ``FrameDecoder``. Pure, no I/O.

Frame layout, byte by byte::

    offset  size  field
    0       4     N, the body length: unsigned 32-bit big-endian integer, 1 <= N <= max_frame
    4       N     body: one msgpack array, decoded by ``qdash_mp.wire.codec.decode_body``

A length header above ``max_frame`` is refused as soon as its four bytes arrive, before any
of the body is buffered; a length of 0 is refused. A decoder that raised stays failed: the
connection it reads is to be closed.
"""

from __future__ import annotations

from qdash_mp.errors import ProtocolError
from qdash_mp.records import MAX_DEPTH, MAX_FRAME, MAX_ITEMS
from qdash_mp.wire.codec import HEADER, decode
from qdash_mp.wire.messages import Message


class FrameDecoder:
    """Splits a byte stream into frames and decodes each into a message.

    ``feed`` may get any slice of the stream (one byte, many frames); it buffers a partial
    frame until the rest arrives. A header announcing more than ``max_frame`` bytes is
    refused before any of that body is buffered. After a ``ProtocolError`` the decoder stays
    failed (every later ``feed`` raises the same error) and messages decoded earlier in the
    failing ``feed`` are dropped: the connection is to be closed, and nothing in it counts
    as received.
    """

    def __init__(
        self,
        max_frame: int = MAX_FRAME,
        *,
        max_items: int = MAX_ITEMS,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        if not 1 <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be in 1..{0xFFFFFFFF}, not {max_frame}")
        self.max_frame = max_frame
        self.max_items = max_items
        self.max_depth = max_depth
        self._buf = bytearray()
        self._need = -1  # body length of the frame being read; -1 while reading a header
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial frame)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Every message completed by ``data``, in order; ``ProtocolError`` on bad input."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        # Frames are cut straight out of ``data`` (one copy each); only a partial frame at
        # its end waits in the buffer for the rest.
        buf = self._buf
        if buf:
            buf += data
            data = buf
        out: list[Message] = []
        pos = 0
        end = len(data)
        need = self._need
        while True:
            if need < 0:
                if end - pos < HEADER.size:
                    break
                (n,) = HEADER.unpack_from(data, pos)
                if n > self.max_frame:
                    raise ProtocolError(
                        f"frame header announces {n} bytes, over the {self.max_frame} byte limit"
                    )
                if n == 0:
                    raise ProtocolError("empty frame (length 0)")
                pos += HEADER.size
                need = n
            if end - pos < need:
                break
            body = bytes(data[pos : pos + need])
            pos += need
            need = -1
            out.append(decode(body, self.max_items, self.max_depth))
        self._need = need
        if data is buf:
            del buf[:pos]
        else:
            buf += data[pos:]
        return out
