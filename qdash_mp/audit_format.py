"""The audit log's bytes: a file header, then length-prefixed, checksummed JSON records.

Pure, no I/O. All integers little-endian::

    file header (16 bytes)
    offset  size  field
    0       8     magic  b"QDAUDIT\\n"
    8       4     version u32 = 1
    12      4     crc32 of bytes 0..12

    record (8 + N bytes), appended one after another
    0       4     N, payload length u32, 1 .. MAX_PAYLOAD
    4       4     crc32 of bytes 0..4 and of the payload
    8       N     payload: UTF-8 JSON object (``AuditEntry.to_dict``)

The header as hex::

    51 44 41 55 44 49 54 0a  01 00 00 00  5e 1b 70 ea

Reading (``decode``): records are taken while they verify. At the first one that does not,
the rest is a *torn tail* (cut, reported) when it can be one interrupted append: the record
runs past the end of the file, or ends exactly at the end of the file with a bad checksum, or
its length is unreadable and what is left is no longer than one record. Anything else (a bad
record with whole records after it, JSON that does not parse under a good checksum, a bad
header) is corruption: ``AuditCorrupt``, never silently skipped.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from qdash_mp.errors import AuditCorrupt

__all__ = ["HEADER", "HEADER_SIZE", "MAGIC", "MAX_PAYLOAD", "Decoded", "decode", "encode_record"]

MAGIC = b"QDAUDIT\n"
VERSION = 1
HEADER_SIZE = 16
MAX_PAYLOAD = 64 * 1024
_HEAD = struct.Struct("<8sI")
_REC = struct.Struct("<II")


def _header() -> bytes:
    head = _HEAD.pack(MAGIC, VERSION)
    return head + struct.pack("<I", zlib.crc32(head))


HEADER = _header()


def encode_record(entry: dict[str, Any]) -> bytes:
    """One record for ``entry`` (a JSON-able dict); ``ValueError`` if it is too large."""
    payload = json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if not 0 < len(payload) <= MAX_PAYLOAD:
        raise ValueError(f"audit record of {len(payload)} bytes (max {MAX_PAYLOAD})")
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", zlib.crc32(payload, zlib.crc32(length))) + payload


@dataclass(frozen=True, slots=True)
class Decoded:
    """The records read, where the good bytes end, and why the rest was cut (or None)."""

    entries: list[dict[str, Any]]
    end: int
    torn: str | None


def decode(buf: bytes) -> Decoded:
    """Every record of a whole file; a torn tail is reported, corruption raises."""
    if len(buf) < HEADER_SIZE:
        if HEADER.startswith(buf):
            return Decoded([], 0, "incomplete header" if buf else None)
        raise AuditCorrupt("not an audit log (bad header)")
    if buf[:HEADER_SIZE] != HEADER:
        raise AuditCorrupt("not an audit log of version 1 (bad header)")
    entries: list[dict[str, Any]] = []
    off = HEADER_SIZE
    size = len(buf)
    while off < size:
        left = size - off
        if left < _REC.size:
            return Decoded(entries, off, f"{left} bytes of a record header at {off}")
        n, crc = _REC.unpack_from(buf, off)
        end = off + _REC.size + n
        if not 0 < n <= MAX_PAYLOAD:
            if left <= _REC.size + MAX_PAYLOAD:
                return Decoded(entries, off, f"unreadable record length at {off}")
            raise AuditCorrupt(f"bad record length {n} at offset {off}, records follow")
        if end > size:
            return Decoded(entries, off, f"record at {off} runs past the end")
        payload = buf[off + _REC.size : end]
        if zlib.crc32(payload, zlib.crc32(buf[off : off + 4])) != crc:
            if end == size:
                return Decoded(entries, off, f"bad checksum of the last record at {off}")
            raise AuditCorrupt(f"bad checksum of the record at offset {off}, records follow")
        try:
            entry = json.loads(payload.decode("utf-8"))
        except ValueError:
            raise AuditCorrupt(f"record at offset {off} is not JSON") from None
        if not isinstance(entry, dict):
            raise AuditCorrupt(f"record at offset {off} is not an object")
        entries.append(entry)
        off = end
    return Decoded(entries, off, None)
