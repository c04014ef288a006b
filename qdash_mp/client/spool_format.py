"""The client spool's file format: framing, encoding and the verifying scanner.

A ``Client`` given a ``spool_dir`` writes the batches it cannot deliver (collector down,
memory bound reached, process exiting) to a *spool file*; a later client replays them to the
collector under the spooled client id, and the collector's (client id, batch seq) dedup
makes that replay exact. This module is the pure part: bytes in, bytes out, no I/O, so every
offset and every bit flip can be tested on plain ``bytes``. ``qdash_mp.client.spool`` owns the
files, their locks and the replay.

A spool file holds the batches of **one** client id, numbered consecutively, each stored as
the very BATCH frame that goes on the wire (``docs/protocol.md``): replaying is sending
those bytes again. Nothing is ever rewritten in place; the file only grows (appends made
durable with ``fsync``) until its last batch is acknowledged and it is deleted.

File layout (all integers little-endian)::

    header, once, at offset 0
    offset  size  field
    0       8     magic      b"QDSPOOL\\x00"
    8       2     version    uint16, FORMAT_VERSION (1)
    10      2     n          uint16, byte length of the client id, 1 .. 512
    12      n     client_id  UTF-8, 1 .. 128 characters (the wire's limit)
    12+n    4     crc        uint32, zlib.crc32 of bytes 0 .. 12+n (everything before it)

    records, one per batch, back to back until the end of the file
    offset  size  field
    0       4     crc        uint32, zlib.crc32 of bytes 4 .. 16+N (seq, length and frame)
    4       8     seq        uint64, the batch's sequence number (1 .. 2**63-1)
    12      4     N          uint32, byte length of the frame, 5 .. 4 + MAX_FRAME
    16      N     frame      the wire frame: 4-byte big-endian body length N-4, then the
                             msgpack body [3, seq, counters, failed]

A record is accepted only if its checksum matches, ``N`` is in range, the frame decodes (by
the wire protocol's strict rules) to exactly one BATCH whose seq equals the record's, and
that seq is the previous record's plus one (the first record may start anywhere: earlier
batches were acknowledged before they were spooled). The first record that fails any check
ends the good part of the file: it and everything after it are the *torn tail* (a crash in
the middle of an append), reported and cut, never sent. A header that fails its checks makes
the whole file unreadable (``SpoolCorrupt``): without it the client id is unknown.

Example: client id ``"ab"``, one batch ``Batch(seq=1, counters={"q": (1, 0, 0, 0)})``::

    51 44 53 50 4f 4f 4c 00   magic "QDSPOOL\\0"
    01 00                     version 1
    02 00                     n = 2
    61 62                     "ab"
    2c fb 77 8b               crc32 of the 14 bytes above
    56 ea 0e f4               record crc32 of the next 12 + 16 bytes
    01 00 00 00 00 00 00 00   seq 1
    10 00 00 00               N = 16
    00 00 00 0c               frame: body of 12 bytes
    94 03 01 81 a1 71 94 01 00 00 00 90   [3, 1, {"q": [1, 0, 0, 0]}, []]
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from qdash_mp.errors import ProtocolError, QdashError
from qdash_mp.wire import HEADER as FRAME_HEADER
from qdash_mp.wire import MAX_CLIENT_ID, MAX_FRAME, MAX_INT, Batch, decode_body

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_ID_BYTES",
    "RECORD_HEAD",
    "RecordRef",
    "ScanResult",
    "SpoolCorrupt",
    "decode_header",
    "encode_header",
    "encode_record",
    "scan",
]

MAGIC: Final = b"QDSPOOL\x00"
FORMAT_VERSION: Final = 1
MAX_ID_BYTES: Final = 4 * MAX_CLIENT_ID
"""Longest client id in UTF-8 bytes (128 characters of at most 4 bytes)."""

_HEAD: Final = struct.Struct("<8sHH")
_CRC: Final = struct.Struct("<I")
RECORD_HEAD: Final = struct.Struct("<IQI")
"""crc, seq, N: the 16 bytes in front of every frame."""
_SEQ_LEN: Final = struct.Struct("<QI")
_MIN_FRAME: Final = FRAME_HEADER.size + 1
_MAX_FRAME_BYTES: Final = FRAME_HEADER.size + MAX_FRAME

Buffer = bytes | bytearray | memoryview | mmap.mmap


class SpoolCorrupt(QdashError):
    """A spool file's header is damaged or not a spool header: the file cannot be replayed."""


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where one verified record's frame lies in the file."""

    seq: int
    offset: int
    """Offset of the frame (the record's byte 16)."""
    size: int
    """Byte length of the frame, ``N``."""

    @property
    def end(self) -> int:
        """Offset just past this record."""
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a scan of a whole spool file found."""

    client_id: str
    header_size: int
    records: list[RecordRef]
    end: int
    """Length of the good part: the header and every accepted record."""
    problem: str | None
    """Why the bytes from ``end`` on were not accepted; ``None`` if the file is whole."""

    @property
    def first_seq(self) -> int:
        """Seq of the first record, 0 if none."""
        return self.records[0].seq if self.records else 0

    @property
    def last_seq(self) -> int:
        """Seq of the last accepted record, 0 if none."""
        return self.records[-1].seq if self.records else 0


def encode_header(client_id: str) -> bytes:
    """The header of a spool file for ``client_id``."""
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= MAX_CLIENT_ID:
        raise ValueError(f"client_id must be a str of 1..{MAX_CLIENT_ID} characters")
    raw = client_id.encode("utf-8")
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw
    return head + _CRC.pack(zlib.crc32(head))


def decode_header(buf: Buffer) -> tuple[str, int]:
    """``(client_id, header size)`` of a spool file; ``SpoolCorrupt`` if it is not valid."""
    if len(buf) < _HEAD.size:
        raise SpoolCorrupt(f"file of {len(buf)} bytes is too short for a spool header")
    magic, version, n = _HEAD.unpack(bytes(buf[: _HEAD.size]))
    if magic != MAGIC:
        raise SpoolCorrupt(f"not a spool file (magic {magic!r})")
    if not 1 <= n <= MAX_ID_BYTES:
        raise SpoolCorrupt(f"client id length {n} out of range")
    size = _HEAD.size + n + _CRC.size
    if len(buf) < size:
        raise SpoolCorrupt("spool header is cut short")
    head = bytes(buf[: _HEAD.size + n])
    (crc,) = _CRC.unpack(bytes(buf[_HEAD.size + n : size]))
    if zlib.crc32(head) != crc:
        raise SpoolCorrupt("spool header checksum mismatch")
    if version != FORMAT_VERSION:
        raise SpoolCorrupt(f"spool format version {version} is not supported")
    try:
        client_id = head[_HEAD.size :].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpoolCorrupt(f"client id is not UTF-8: {exc}") from None
    if not 1 <= len(client_id) <= MAX_CLIENT_ID:
        raise SpoolCorrupt(f"client id of {len(client_id)} characters out of range")
    return client_id, size


def encode_record(seq: int, frame: bytes) -> bytes:
    """One record holding the BATCH ``frame`` of batch ``seq`` (not checked here)."""
    if not 1 <= seq <= MAX_INT:
        raise ValueError(f"seq must be in 1..{MAX_INT}, not {seq}")
    if not _MIN_FRAME <= len(frame) <= _MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {len(frame)} bytes cannot be spooled")
    tail = _SEQ_LEN.pack(seq, len(frame))
    return _CRC.pack(zlib.crc32(frame, zlib.crc32(tail))) + tail + frame


def _check_frame(frame: bytes, seq: int) -> str | None:
    (body_len,) = FRAME_HEADER.unpack(frame[: FRAME_HEADER.size])
    if body_len != len(frame) - FRAME_HEADER.size:
        return f"frame length {body_len} does not match the record ({len(frame)} bytes)"
    try:
        msg = decode_body(frame[FRAME_HEADER.size :])
    except ProtocolError as exc:
        return f"frame does not decode: {exc}"
    if not isinstance(msg, Batch):
        return f"frame holds a {type(msg).__name__}, not a BATCH"
    if msg.seq != seq:
        return f"frame holds batch {msg.seq}, the record says {seq}"
    return None


def scan(buf: Buffer, *, verify: bool = True) -> ScanResult:
    """Read a whole spool file's bytes: its header and every record that verifies.

    Stops at the first record that does not verify and reports why in ``problem``. With
    ``verify=False`` frames are checked by checksum and length only, not decoded.
    Raises ``SpoolCorrupt`` if the header is not valid.
    """
    client_id, pos = decode_header(buf)
    header_size = pos
    total = len(buf)
    records: list[RecordRef] = []
    problem: str | None = None
    prev = 0
    while pos < total:
        if total - pos < RECORD_HEAD.size:
            problem = f"record header cut short at offset {pos}"
            break
        crc, seq, n = RECORD_HEAD.unpack(bytes(buf[pos : pos + RECORD_HEAD.size]))
        if not _MIN_FRAME <= n <= _MAX_FRAME_BYTES:
            problem = f"record at offset {pos}: frame length {n} out of range"
            break
        start = pos + RECORD_HEAD.size
        if total - start < n:
            problem = f"record at offset {pos} is cut short ({total - start} of {n} bytes)"
            break
        frame = bytes(buf[start : start + n])
        if zlib.crc32(frame, zlib.crc32(bytes(buf[pos + _CRC.size : start]))) != crc:
            problem = f"record at offset {pos}: checksum mismatch"
            break
        if not 1 <= seq <= MAX_INT or (prev and seq != prev + 1):
            problem = f"record at offset {pos}: batch {seq} does not follow batch {prev}"
            break
        if verify and (why := _check_frame(frame, seq)) is not None:
            problem = f"record at offset {pos}: {why}"
            break
        records.append(RecordRef(seq=seq, offset=start, size=n))
        prev = seq
        pos = start + n
    return ScanResult(
        client_id=client_id,
        header_size=header_size,
        records=records,
        end=pos,
        problem=problem,
    )
