"""The failed-job journal's on-disk format: record framing, payload codecs, the header.

Pure functions and classes over bytes, without any I/O: the rest of ``qdash_mp.journal``
owns the files, the index and the durability rules, and uses what is here to encode what
it appends and to read back what it finds (reading a sequence of records is ``scan``).
Keeping the format apart makes it testable on plain ``bytes`` (every byte offset, every
bit flip) and keeps the hot encode path small.

Segment file
------------

A journal is a directory of *segment* files named ``NNNNNNNNNN.GGGG.seg`` (segment number
``N`` and generation ``G``, decimal, zero-padded to at least 10 and 4 digits). A segment is
a sequence of records; the first record is always a ``SEGMENT`` header, and records are
grouped into *batches*, each closed by a ``COMMIT`` record. One batch is what one
``Journal.commit()`` wrote with one write and made durable with one fsync, so a batch is
all-or-nothing on recovery: records after the last ``COMMIT`` of the last segment were
never acknowledged and are cut as a torn tail -- unless the batch was written to its last
byte and only its COMMIT is damaged, which recovery repairs (``scan.classify_last_commit``).

Record framing (all integers little-endian)::

    offset  size  field
    0       4     crc      uint32, zlib.crc32 (CRC-32/ISO-HDLC, the zlib/PNG one) of bytes
                           4 .. 9+N, i.e. over length + type + payload
    4       4     length   uint32 N, bytes of payload (at most MAX_PAYLOAD)
    8       1     type     uint8, one of RecordType
    9       N     payload  type-specific, below

For example, the COMMIT record closing a batch of 2 records that began at offset 61::

    c6 d3 24 1c   0c 00 00 00   02     3d 00 00 00 00 00 00 00   02 00 00 00
    crc           length = 12   COMMIT batch start = 61            count = 2

The checksum covers the length and the type as well as the payload, so a flipped length or
type is caught like a flipped payload byte. A record is accepted only if the checksum
matches, the type is known and allowed where it stands, and the payload decodes to the exact
shape of its type: a damaged record with a "fixed-up" checksum still fails the decode.

Payloads (msgpack, ``use_bin_type=True``, strings UTF-8 ``str``, except COMMIT)::

    1 SEGMENT     ["qdash-mp-journal", format_version:int, num:int, gen:int,
                   prev_num:int, prev_gen:int, prev_end:int, created_at:float]
                  Only at offset 0. ``gen > 0`` marks a compacted segment: it holds the live
                  set of every segment ``(n, g) < (num, gen)`` and replaces them. ``prev_*``
                  name the segment this one followed when it was started (-1 if none) and
                  how many bytes of it were durable then: bytes of that segment beyond
                  ``prev_end`` belong to a failed commit and are cut on recovery.
    2 COMMIT      12 raw bytes, struct "<QI": offset of the batch's first record in this
                  segment, number of records in the batch (the COMMIT itself excluded).
    3 FAILED      [id:str, name:str, payload_raw:bin, attempts:int, enqueued_at:float|None,
                   queue:str, error:str, traceback:str, failed_at:float]
                  The wire protocol's FAILED array, byte for byte as the worker sent it
                  (``payload_raw`` is the msgpack encoding of the job payload), so a retry
                  sends back what was received. Checked on write and on recovery by the
                  protocol's own ``check_failed``: one set of rules for wire and disk.
    4 REMOVED     [id:str, reason:str]   reason: "retried" | "forgotten" | "pruned"
                  Drops the record of ``id`` that is live at this point of the journal.
    5 FLUSHED     []                     Drops every failed job recorded before it.
    6 CLIENT_SEQ  [client_id:str, seq:int, at:float]
                  The highest batch sequence number of ``client_id`` applied so far (the
                  collector's dedup state); ``at`` is the journal clock when it was written.
    7 HISTORY     the FAILED array of a failure that a dashboard retry re-enqueued, byte for
                  byte as it was stored (format version 2 on). It is not a live failed job:
                  it is the job page's *retry history* of that job id (the link is the id:
                  a later failure of the re-enqueued job carries the same id). Written in the
                  same batch as the REMOVED "retried" of that failure; compaction copies the
                  history it keeps (``HISTORY_PER_ID`` per id, ``HISTORY_IDS`` ids).

Format versions (the SEGMENT record's ``format_version``): 1 has record types 1..6; 2 adds
HISTORY. Version 2 reads version-1 segments as they are and writes version 2; a reader of
version 1 refuses a version-2 segment ("unsupported journal format version 2") instead of
misreading it.

A HISTORY record, byte for byte (the FAILED example of ``qdash_mp.records``, 67 bytes of
payload; 76 bytes in all)::

    bd d1 19 2c   43 00 00 00   07     99 a2 6a 31 aa 73 65 ...  cb 41 d9 54 fc 40 60 00 00
    crc           length = 67   HISTORY  the FAILED array, as stored

A later FAILED record with the id of a live one supersedes it (the job failed again).
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from typing import Any, Final, Protocol

import msgpack

from qdash_mp.records import check_failed

__all__ = [
    "COMMIT_SIZE",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "READ_VERSIONS",
    "REASONS",
    "Buffer",
    "FailedFields",
    "Op",
    "Problem",
    "RecordType",
    "SegmentHeader",
    "append_record",
    "commit_record",
    "decode_failed",
    "decode_op",
    "encode_client_seq",
    "failed_metas",
    "encode_removed",
    "encode_removed_many",
    "flushed_payload",
    "frame_records",
    "header_size",
    "read_header",
    "read_record",
    "record_header",
    "segment_record",
]

MAGIC: Final = "qdash-mp-journal"
FORMAT_VERSION: Final = 2
READ_VERSIONS: Final = frozenset({1, 2})
"""Segment format versions this code reads (see the module docstring)."""
MAX_PAYLOAD: Final = 64 * 1024 * 1024
"""Largest payload a record may have (the wire caps a whole frame at 16 MiB)."""

HEADER: Final = struct.Struct("<IIB")
"""crc, length, type: the 9 bytes in front of every payload."""
_LEN_TYPE: Final = struct.Struct("<IB")
_CRC: Final = struct.Struct("<I")
_COMMIT: Final = struct.Struct("<QI")
COMMIT_SIZE: Final = HEADER.size + _COMMIT.size
"""Bytes of one whole COMMIT record."""

REASONS: Final = frozenset({"retried", "forgotten", "pruned"})
"""What a REMOVED record may give as its reason."""


class RecordType(IntEnum):
    """The ``type`` byte of a record."""

    SEGMENT = 1
    COMMIT = 2
    FAILED = 3
    REMOVED = 4
    FLUSHED = 5
    CLIENT_SEQ = 6
    HISTORY = 7


_SEGMENT = int(RecordType.SEGMENT)
_COMMIT_T = int(RecordType.COMMIT)
_FAILED = int(RecordType.FAILED)
_REMOVED = int(RecordType.REMOVED)
_FLUSHED = int(RecordType.FLUSHED)
_CLIENT_SEQ = int(RecordType.CLIENT_SEQ)
_HISTORY = int(RecordType.HISTORY)

Op = tuple[int, str, int, Any]
"""One data record as the index sees it: ``(type, key, size, extra)``.

``key`` is the job id (FAILED, REMOVED, HISTORY), the client id (CLIENT_SEQ) or ``""`` (FLUSHED);
``size`` the whole record's bytes; ``extra`` is ``failed_at`` (FAILED), the reason
(REMOVED), ``(seq, at)`` (CLIENT_SEQ), ``failed_at`` (HISTORY) or ``None``.
"""


class Buffer(Protocol):
    """What the scanner reads: ``bytes``, ``bytearray`` or a read-only ``mmap``."""

    def __getitem__(self, index: slice, /) -> bytes | bytearray: ...

    def __len__(self) -> int: ...

    def find(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...


_local = threading.local()


def _packb(obj: Any) -> bytes:
    """msgpack with a per-thread ``Packer`` (twice as fast as ``msgpack.packb``)."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    data: bytes = packer.pack(obj)
    return data


def _unpackb(data: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, max_ext_len=0, strict_map_key=True)


# --------------------------------------------------------------------------- encoding


def record_header(rtype: int, payload: bytes) -> bytes:
    """The 9 bytes (crc, length, type) that go in front of ``payload``."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"record payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(zlib.crc32(payload, zlib.crc32(_LEN_TYPE.pack(n, rtype))), n, rtype)


def frame_records(rtype: int, payloads: Iterable[bytes]) -> bytearray:
    """Many records of ``rtype`` back to back: what ``record_header`` + payload each makes.

    ``ValueError`` (and nothing framed) if a payload is over ``MAX_PAYLOAD`` bytes.
    """
    out = bytearray()
    pack = HEADER.pack
    crc32 = zlib.crc32
    # A record's CRC starts from that of its length and type bytes: once per length.
    head_crcs: dict[int, int] = {}
    for payload in payloads:
        n = len(payload)
        start = head_crcs.get(n)
        if start is None:
            if n > MAX_PAYLOAD:
                raise ValueError(
                    f"record payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                )
            start = head_crcs[n] = crc32(_LEN_TYPE.pack(n, rtype))
        out += pack(crc32(payload, start), n, rtype)
        out += payload
    return out


def append_record(buf: bytearray, rtype: int, payload: bytes) -> int:
    """Frame ``payload`` as a record of ``rtype`` at the end of ``buf``; returns its size."""
    buf += record_header(rtype, payload)
    buf += payload
    return HEADER.size + len(payload)


def encode_removed(id: str, reason: str) -> bytes:
    """The REMOVED payload."""
    return _packb([id, reason])


def encode_removed_many(ids: Iterable[str], reason: str) -> list[bytes]:
    """``[encode_removed(id, reason) for id in ids]`` in one C-level pass (a tuple packs
    as the same array as a list)."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return list(map(packer.pack, zip(ids, repeat(reason))))


def flushed_payload() -> bytes:
    """The FLUSHED payload (an empty array)."""
    return b"\x90"


def encode_client_seq(client_id: str, seq: int, at: float) -> bytes:
    """The CLIENT_SEQ payload."""
    return _packb([client_id, seq, at])


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """What a segment's SEGMENT record says about it."""

    num: int
    gen: int
    prev_num: int = -1
    prev_gen: int = -1
    prev_end: int = -1
    created_at: float = 0.0

    @property
    def compacted(self) -> bool:
        """A compacted segment replaces every segment ordered before it."""
        return self.gen > 0


def segment_record(header: SegmentHeader) -> bytes:
    """The whole SEGMENT record that starts a segment file."""
    buf = bytearray()
    payload = _packb(
        [
            MAGIC,
            FORMAT_VERSION,
            header.num,
            header.gen,
            header.prev_num,
            header.prev_gen,
            header.prev_end,
            float(header.created_at),
        ]
    )
    append_record(buf, _SEGMENT, payload)
    return bytes(buf)


def commit_record(batch_start: int, count: int) -> bytes:
    """The COMMIT record closing a batch of ``count`` records that began at ``batch_start``."""
    buf = bytearray()
    append_record(buf, _COMMIT_T, _COMMIT.pack(batch_start, count))
    return bytes(buf)


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class FailedFields:
    """A decoded FAILED payload."""

    id: str
    name: str
    payload_raw: bytes
    attempts: int
    enqueued_at: float | None
    queue: str
    error: str
    traceback: str
    failed_at: float


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the bytes at ``offset`` are not a valid record (or batch)."""

    offset: int
    reason: str


def _is_float(value: object) -> bool:
    return type(value) is float


def decode_failed(payload: bytes | memoryview) -> FailedFields:
    """The fields of a FAILED payload; ``ValueError`` if it is not one."""
    obj = _unpackb(payload)
    why = check_failed(obj)
    if why:
        raise ValueError(why)
    return FailedFields(*obj)


def failed_metas(datas: Iterable[bytes]) -> list[tuple[str, str, str]]:
    """``(queue, name, error)`` of each of ``datas``, msgpack bytes of checked FAILED arrays.

    For records staged without them (``Batch.metas`` carries them from the wire decode):
    the plainest (cheapest) decode, tuples rather than lists (no GC tracking).
    """
    unpack = msgpack.unpackb
    out = []
    for data in datas:
        obj = unpack(data, use_list=False)
        out.append((obj[5], obj[1], obj[6]))
    return out


def decode_op(
    rtype: int,
    payload: bytes | bytearray | memoryview,
    size: int,
    metas: list[tuple[str, str, str]] | None = None,
) -> Op | str:
    """The index op of a data record, or a reason string if it does not decode.

    ``metas``: a FAILED record's (queue, name, error) is appended to it (the filter columns'
    fields, taken from this one decode)."""
    try:
        obj = _unpackb(payload)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        return f"undecodable payload ({type(exc).__name__})"
    if rtype == _FAILED:
        why = check_failed(obj)
        if why:
            return why
        if metas is not None:
            metas.append((obj[5], obj[1], obj[6]))
        return (_FAILED, obj[0], size, obj[8])
    if rtype == _HISTORY:
        why = check_failed(obj, "HISTORY")
        return why or (_HISTORY, obj[0], size, obj[8])
    if type(obj) is not list:
        return "payload is not an array"
    if rtype == _REMOVED:
        if len(obj) == 2 and type(obj[0]) is str and obj[0] and obj[1] in REASONS:
            return (_REMOVED, obj[0], size, obj[1])
        return "malformed REMOVED payload"
    if rtype == _FLUSHED:
        if not obj:
            return (_FLUSHED, "", size, None)
        return "malformed FLUSHED payload"
    if rtype == _CLIENT_SEQ:
        if (
            len(obj) == 3
            and type(obj[0]) is str
            and obj[0]
            and type(obj[1]) is int
            and obj[1] >= 0
            and _is_float(obj[2])
        ):
            return (_CLIENT_SEQ, obj[0], size, (obj[1], obj[2]))
        return "malformed CLIENT_SEQ payload"
    return f"record type {rtype} not allowed here"


def read_record(buf: Buffer, pos: int, end: int) -> tuple[int, int, bytes] | Problem:
    """``(type, size, payload)`` of the checksummed record at ``pos``, or a ``Problem``.

    Only the framing is checked here (room, length, checksum, known type); the payload is
    not decoded.
    """
    if end - pos < HEADER.size:
        return Problem(pos, "incomplete record header")
    crc, n, rtype = HEADER.unpack(buf[pos : pos + HEADER.size])
    if n > MAX_PAYLOAD or pos + HEADER.size + n > end:
        return Problem(pos, f"record length {n} runs past the end of the data")
    body = buf[pos + 4 : pos + HEADER.size + n]
    if zlib.crc32(body) != crc:
        return Problem(pos, "checksum mismatch")
    if not _SEGMENT <= rtype <= _HISTORY:
        return Problem(pos, f"unknown record type {rtype}")
    return rtype, HEADER.size + n, bytes(body[5:])


def read_header(buf: Buffer, end: int) -> SegmentHeader | Problem:
    """The SEGMENT record at offset 0, or a ``Problem``."""
    rec = read_record(buf, 0, end)
    if isinstance(rec, Problem):
        return rec
    rtype, _size, payload = rec
    if rtype != _SEGMENT:
        return Problem(0, "segment does not start with a SEGMENT record")
    try:
        obj = _unpackb(payload)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return Problem(0, "undecodable SEGMENT record")
    if not (
        type(obj) is list
        and len(obj) == 8
        and obj[0] == MAGIC
        and all(type(v) is int for v in obj[1:7])
        and _is_float(obj[7])
    ):
        return Problem(0, "malformed SEGMENT record")
    if obj[1] not in READ_VERSIONS:
        return Problem(0, f"unsupported journal format version {obj[1]}")
    return SegmentHeader(*obj[2:])


def header_size(buf: Buffer) -> int:
    """Bytes of the SEGMENT record at offset 0 (call after ``read_header`` succeeded)."""
    _crc, n, _t = HEADER.unpack(buf[0 : HEADER.size])
    return HEADER.size + int(n)
